//! The nemesis: the faults a run injects, how each is applied and healed.
//! Every choice (which node, which split, how much) comes from the run's
//! seeded random generator, so a seed replays the same faults.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::cluster::{alive, controller_host, Cluster, CONTROLLERS, SITES};
use crate::net::Net;

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// SIGKILL of a random controller, restarted at heal.
    Kill,
    /// SIGSTOP of the leader, SIGCONT at heal.
    PauseLeader,
    /// Two controllers cut off from the other three, both ways.
    PartitionMinority,
    /// The leader cut off from the others, both ways.
    PartitionLeader,
    /// The leader hears nobody; everybody hears it.
    PartitionOneWay,
    /// Two halves of two that only the fifth node sees both of.
    PartitionBridge,
    /// Each controller hears only its two ring neighbours.
    PartitionRing,
    /// 25% of the packets each controller receives are dropped.
    Loss,
    /// What each controller receives from the others is policed to 48 KB/s.
    Bandwidth,
    /// The leader's data disk is filled to the last byte.
    DiskFull,
    /// A follower is killed, a bit of its newest log segment flipped or its
    /// last record cut, and it is started again.
    CorruptLog,
    /// A follower runs with a failpoint that, a few appends on, loses part
    /// of an unsynced write and aborts; restarted at heal.
    TornWrite,
    /// A follower is removed from the membership and wiped; at heal it
    /// joins again as a new node.
    Membership,
    /// A whole site (gateway and DNS server) is killed; restarted at heal.
    SiteLost,
    /// Every controller is killed; the sites must keep serving their last
    /// view (static stability). Restarted at heal.
    ControllersLost,
}

impl Kind {
    /// Every kind, in a fixed order.
    pub const ALL: [Kind; 15] = [
        Kind::Kill,
        Kind::PauseLeader,
        Kind::PartitionMinority,
        Kind::PartitionLeader,
        Kind::PartitionOneWay,
        Kind::PartitionBridge,
        Kind::PartitionRing,
        Kind::Loss,
        Kind::Bandwidth,
        Kind::DiskFull,
        Kind::CorruptLog,
        Kind::TornWrite,
        Kind::Membership,
        Kind::SiteLost,
        Kind::ControllersLost,
    ];

    /// Its name on the command line and in reports.
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    }

    /// Parses a name; the error lists the valid ones.
    pub fn parse(s: &str) -> anyhow::Result<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .with_context(|| {
                let names: Vec<String> = Kind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown fault {s:?}; known: {}", names.join(", "))
            })
    }

    /// Whether it touches a site's data plane itself (calls may fail
    /// while it lasts); every other kind hits only the control plane,
    /// which the sites must ride out.
    pub fn hits_data_plane(self) -> bool {
        matches!(self, Kind::SiteLost)
    }

    /// Faults that replace processes or membership: two of them at once
    /// would step on each other, so a mixed run never overlaps them.
    fn exclusive(self) -> bool {
        matches!(
            self,
            Kind::Membership | Kind::ControllersLost | Kind::CorruptLog | Kind::TornWrite
        )
    }
}

/// How to undo an injected fault.
#[derive(Debug)]
enum Heal {
    Restart(Vec<u64>),
    Cont(u64),
    Links,
    Unfill(PathBuf),
    RestartSite(String),
    Rejoin(u64),
    Nothing,
}

/// A fault in force.
#[derive(Debug)]
pub struct Injected {
    /// Its kind.
    pub kind: Kind,
    /// What exactly was done (nodes, splits).
    pub detail: String,
    heal: Heal,
}

/// Whether two kinds may be in force together.
pub fn compatible(a: Kind, b: Kind) -> bool {
    a != b && !a.exclusive() && !b.exclusive()
}

fn names(ids: &[u64]) -> Vec<String> {
    ids.iter().map(|i| controller_host(*i)).collect()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A random controller other than the leader (any, without one).
fn follower(rng: &mut StdRng, leader: Option<u64>) -> u64 {
    let others: Vec<u64> = CONTROLLERS
        .into_iter()
        .filter(|i| Some(*i) != leader)
        .collect();
    *others.choose(rng).expect("five controllers")
}

/// Applies one fault.
pub async fn inject(
    kind: Kind,
    cluster: &mut Cluster,
    net: &Net,
    rng: &mut StdRng,
) -> anyhow::Result<Injected> {
    let leader = cluster.leader().await;
    let any = || -> u64 { CONTROLLERS[0] };
    let (detail, heal) = match kind {
        Kind::Kill => {
            let id = *CONTROLLERS.choose(rng).expect("five");
            cluster.kill(id).await;
            (format!("killed c{id}"), Heal::Restart(vec![id]))
        }
        Kind::PauseLeader => {
            let id = leader.unwrap_or_else(any);
            cluster.signal(id, "STOP")?;
            (format!("paused c{id} (leader: {leader:?})"), Heal::Cont(id))
        }
        Kind::PartitionMinority | Kind::PartitionLeader => {
            let mut ids = CONTROLLERS.to_vec();
            ids.shuffle(rng);
            let minority: Vec<u64> = if kind == Kind::PartitionLeader {
                vec![leader.unwrap_or_else(any)]
            } else {
                ids[..2].to_vec()
            };
            let majority: Vec<u64> = CONTROLLERS
                .into_iter()
                .filter(|i| !minority.contains(i))
                .collect();
            let (mi, ma) = (names(&minority), names(&majority));
            for x in &mi {
                net.drop_from(x, &refs(&ma))?;
            }
            for y in &ma {
                net.drop_from(y, &refs(&mi))?;
            }
            (format!("{mi:?} | {ma:?}"), Heal::Links)
        }
        Kind::PartitionOneWay => {
            let id = leader.unwrap_or_else(any);
            let others: Vec<u64> = CONTROLLERS.into_iter().filter(|i| *i != id).collect();
            net.drop_from(&controller_host(id), &refs(&names(&others)))?;
            (format!("c{id} hears nobody, all hear it"), Heal::Links)
        }
        Kind::PartitionBridge => {
            let mut ids = CONTROLLERS.to_vec();
            ids.shuffle(rng);
            let (left, bridge, right) = (names(&ids[..2]), ids[2], names(&ids[3..]));
            for x in &left {
                net.drop_from(x, &refs(&right))?;
            }
            for y in &right {
                net.drop_from(y, &refs(&left))?;
            }
            (format!("{left:?} <- c{bridge} -> {right:?}"), Heal::Links)
        }
        Kind::PartitionRing => {
            let mut ids = CONTROLLERS.to_vec();
            ids.shuffle(rng);
            let n = ids.len();
            for i in 0..n {
                let far = names(&[ids[(i + 2) % n], ids[(i + 3) % n]]);
                net.drop_from(&controller_host(ids[i]), &refs(&far))?;
            }
            (format!("ring {:?}", names(&ids)), Heal::Links)
        }
        Kind::Loss => {
            let all: Vec<String> = net.hosts.keys().cloned().collect();
            for id in CONTROLLERS {
                let me = controller_host(id);
                let from: Vec<&str> = all
                    .iter()
                    .filter(|h| **h != me)
                    .map(String::as_str)
                    .collect();
                net.lose(&me, &from, 25)?;
            }
            ("25% loss into every controller".into(), Heal::Links)
        }
        Kind::Bandwidth => {
            for id in CONTROLLERS {
                let others: Vec<u64> = CONTROLLERS.into_iter().filter(|i| *i != id).collect();
                net.cap(&controller_host(id), &refs(&names(&others)), 48)?;
            }
            ("48 KB/s between controllers".into(), Heal::Links)
        }
        Kind::DiskFull => {
            let id = leader.unwrap_or_else(any);
            let fill = cluster.data_dir(id).join("chaos-fill");
            fill_disk(&fill)?;
            (format!("filled c{id}'s disk"), Heal::Unfill(fill))
        }
        Kind::CorruptLog => {
            let id = follower(rng, leader);
            cluster.kill(id).await;
            let seg = cluster
                .newest_segment(id)
                .context("the follower has no log segment")?;
            let what = corrupt(&seg, rng)?;
            cluster.start(id, "")?;
            (format!("c{id}: {what}"), Heal::Nothing)
        }
        Kind::TornWrite => {
            let id = follower(rng, leader);
            cluster.kill(id).await;
            let at = rng.random_range(2..12);
            cluster.start(id, &format!("wal-torn-append@{at}"))?;
            (
                format!("c{id} tears its append #{at} after restart"),
                Heal::Restart(vec![id]),
            )
        }
        Kind::Membership => {
            let id = follower(rng, leader);
            cluster
                .remove_member(id)
                .await
                .with_context(|| format!("removing c{id}"))?;
            cluster.kill(id).await;
            (format!("removed c{id}"), Heal::Rejoin(id))
        }
        Kind::SiteLost => {
            let site = SITES[rng.random_range(1..SITES.len())];
            let s = cluster.fed.sites.get_mut(site).context("site")?;
            s.gateway.kill().await;
            s.dns_proc.kill().await;
            (format!("site {site} lost"), Heal::RestartSite(site.into()))
        }
        Kind::ControllersLost => {
            for id in CONTROLLERS {
                cluster.kill(id).await;
            }
            (
                "every controller killed".into(),
                Heal::Restart(CONTROLLERS.to_vec()),
            )
        }
    };
    Ok(Injected { kind, detail, heal })
}

/// Undoes a fault.
pub async fn heal(f: Injected, cluster: &mut Cluster, net: &Net) -> anyhow::Result<()> {
    match f.heal {
        Heal::Restart(ids) => {
            for id in ids {
                cluster.start(id, "")?;
            }
        }
        Heal::Cont(id) => cluster.signal(id, "CONT")?,
        Heal::Links => {
            for id in CONTROLLERS {
                net.heal(&controller_host(id))?;
            }
        }
        Heal::Unfill(path) => std::fs::remove_file(path)?,
        Heal::RestartSite(site) => {
            let bin = cluster.fed.bin.clone();
            let s = cluster.fed.sites.get_mut(&site).context("site")?;
            if !alive(&mut s.gateway) {
                s.gateway.start(&bin)?;
            }
            if !alive(&mut s.dns_proc) {
                s.dns_proc.start(&bin)?;
            }
        }
        Heal::Rejoin(id) => cluster.rejoin(id).await?,
        Heal::Nothing => {}
    }
    Ok(())
}

/// Writes `path` until the disk is full.
fn fill_disk(path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0xA5u8; 1 << 20];
    loop {
        if let Err(e) = f.write_all(&chunk) {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                // Fill the last partial chunk too.
                let mut small = vec![0xA5u8; 4096];
                while f.write_all(&small).is_ok() {}
                small.truncate(1);
                while f.write_all(&small).is_ok() {}
                return Ok(());
            }
            return Err(e.into());
        }
    }
}

/// Damages a log segment: flips one bit of a written record, or cuts the
/// last record short (zeros, as a preallocated segment reads unwritten).
fn corrupt(seg: &std::path::Path, rng: &mut StdRng) -> anyhow::Result<String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(seg)?;
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut &f, &mut data)?;
    let end = data.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1);
    if end == 0 {
        return Ok(format!("{} is empty; left as is", seg.display()));
    }
    if rng.random_bool(0.5) {
        let at = rng.random_range(end.saturating_sub(4096)..end);
        let bit = rng.random_range(0..8);
        f.write_all_at(&[data[at] ^ (1 << bit)], at as u64)?;
        Ok(format!(
            "flipped bit {bit} at byte {at} of {}",
            seg.display()
        ))
    } else {
        let cut = rng.random_range(end.saturating_sub(64)..end);
        f.write_all_at(&vec![0; end - cut], cut as u64)?;
        Ok(format!(
            "zeroed bytes {cut}..{end} (the tail) of {}",
            seg.display()
        ))
    }
}

/// The kinds a mixed run may put in force together with `active`.
pub fn can_add(kind: Kind, active: &BTreeSet<Kind>) -> bool {
    active.iter().all(|a| compatible(*a, kind))
}
