//! `causeway ca rotate-site`: rotate a site's CA without dropping tunnels.
//!
//! Three steps, each run on the gateway host against the site's state
//! directory, with a pause between them for the change to spread:
//!
//! 1. `start` makes a new CA (`site-ca-next.pem`) and publishes a trust
//!    bundle holding the current and the new CA, so every peer trusts
//!    certificates from either.
//! 2. `finish` makes the new CA the site CA (the old one is kept as
//!    `site-ca-prev.pem`) and republishes both; then each gateway replica of
//!    the site gets SIGHUP and issues its tunnel certificate from the new CA.
//!    Tunnels already up stay up.
//! 3. `prune` publishes the new CA alone and deletes the old one.
//!
//! `finish` moves four files; each rename is made durable before the next,
//! and a `finish` run again after a crash completes whatever is left.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use causeway_api::identity::CertificateAuthority;
use causeway_api::pb;
use causeway_gateway::site::SiteState;

/// A step of a site CA rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Step {
    /// Create the new CA and publish old + new.
    Start,
    /// Switch the site to the new CA.
    Finish,
    /// Publish the new CA alone.
    Prune,
}

struct Files {
    cert: PathBuf,
    key: PathBuf,
}

fn files(dir: &Path, which: &str) -> Files {
    Files {
        cert: dir.join(format!("site-ca{which}.pem")),
        key: dir.join(format!("site-ca{which}-key.pem")),
    }
}

fn load(f: &Files, what: &str) -> anyhow::Result<CertificateAuthority> {
    CertificateAuthority::load(&f.cert, &f.key)
        .with_context(|| format!("loading the {what} site CA from {}", f.cert.display()))
}

/// Whether the files in `dir` are those of a `finish` that stopped part
/// way: the new pair is still (partly) under `-next` while the old one is
/// (partly) under `-prev`. (`start` refuses while a `-prev` pair exists,
/// so outside a `finish` the two never meet.)
fn finish_interrupted(dir: &Path) -> bool {
    let (next, prev) = (files(dir, "-next"), files(dir, "-prev"));
    next.cert.exists() && (prev.key.exists() || prev.cert.exists())
}

/// `finish` on the files: the current pair becomes `-prev`, the `-next`
/// pair becomes current. Four renames, key before certificate, each
/// durable before the next; run again after a crash at any point, it
/// completes what is left. Returns the old and the new CA.
fn finish_files(dir: &Path) -> anyhow::Result<(CertificateAuthority, CertificateAuthority)> {
    let (current, next, prev) = (files(dir, ""), files(dir, "-next"), files(dir, "-prev"));
    let resumed = finish_interrupted(dir);
    let pick = |a: &PathBuf, b: &PathBuf| if a.exists() { a.clone() } else { b.clone() };
    // Both CAs must load before anything moves (resumed: from wherever the
    // cut left each file).
    let old = if resumed {
        Files {
            cert: pick(&prev.cert, &current.cert),
            key: prev.key.clone(),
        }
    } else {
        Files {
            cert: current.cert.clone(),
            key: current.key.clone(),
        }
    };
    let old = load(&old, "current")?;
    let new = Files {
        cert: next.cert.clone(),
        key: pick(&next.key, &current.key),
    };
    let new = load(&new, "new")?;
    let steps = [
        (&current.key, &prev.key),
        (&current.cert, &prev.cert),
        (&next.key, &current.key),
        (&next.cert, &current.cert),
    ];
    for (i, (from, to)) in steps.iter().enumerate() {
        // The old pair's moves are done when their target exists (their
        // source name is taken by the new pair later); the new pair's when
        // their source is gone.
        let done = if i < 2 {
            resumed && to.exists()
        } else {
            !from.exists()
        };
        if done {
            continue;
        }
        std::fs::rename(from, to)
            .with_context(|| format!("renaming {} to {}", from.display(), to.display()))?;
        sync_dir(dir)?;
    }
    Ok((old, new))
}

/// Makes the renames in `dir` durable.
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Runs one step; what happened and what to do next, for the operator.
pub async fn run(state_dir: &Path, step: Step) -> anyhow::Result<String> {
    let state = SiteState::load(state_dir)?.with_context(|| {
        format!(
            "{} holds no joined site (no site.json); run this where the gateway keeps its state",
            state_dir.display()
        )
    })?;
    let (current, next, prev) = (
        files(state_dir, ""),
        files(state_dir, "-next"),
        files(state_dir, "-prev"),
    );
    // A `finish` cut short (a crash between its renames) is completed by
    // running `finish` again; until then the files name it.
    let interrupted = finish_interrupted(state_dir);
    if interrupted && step != Step::Finish {
        bail!(
            "a `finish` was interrupted in {} (site-ca-next and site-ca-prev files both present, \
             the current pair incomplete): run `finish` again to complete it",
            state_dir.display()
        );
    }
    if !current.cert.exists() && !interrupted {
        bail!(
            "{} does not exist: this site's gateways use a CA from elsewhere (site_ca_cert in \
             their config); rotate it there, then publish a bundle with both CAs",
            current.cert.display()
        );
    }
    let (bundle, done) = match step {
        Step::Start => {
            if next.cert.exists() {
                bail!(
                    "a rotation is already under way ({} exists): run `finish`",
                    next.cert.display()
                );
            }
            if prev.cert.exists() || prev.key.exists() {
                bail!(
                    "the last rotation was not pruned ({} exists): run `prune` first",
                    prev.cert.display()
                );
            }
            let old = load(&current, "current")?;
            let new = CertificateAuthority::generate("causeway site CA")?;
            new.save(&next.cert, &next.key)?;
            (
                format!("{}{}", old.cert_pem, new.cert_pem),
                format!(
                    "new CA in {}; peers now trust the current and the new CA. When every site's \
                     gateways have the new bundle (`causeway ctl catalog`), run `finish`.",
                    next.cert.display()
                ),
            )
        }
        Step::Finish => {
            if !next.cert.exists() {
                bail!(
                    "no rotation under way ({} does not exist): run `start` first",
                    next.cert.display()
                );
            }
            let (old, new) = finish_files(state_dir)?;
            (
                format!("{}{}", old.cert_pem, new.cert_pem),
                "the new CA is now the site CA (the old one is in site-ca-prev.pem). Send SIGHUP \
                 to every gateway replica of this site (each issues its tunnel certificate from \
                 the new CA; tunnels stay up), then run `prune`."
                    .to_string(),
            )
        }
        Step::Prune => {
            if next.cert.exists() {
                bail!(
                    "the rotation is not finished ({} exists): run `finish` first",
                    next.cert.display()
                );
            }
            let ca = load(&current, "current")?;
            (
                ca.cert_pem,
                "peers now trust only the new CA; the old one is deleted.".to_string(),
            )
        }
    };
    let mut client = state.controller_client().federation().await?;
    let revision = client
        .update_trust_bundle(pb::UpdateTrustBundleRequest {
            site: state.site.to_string(),
            trust_bundle_pem: bundle,
        })
        .await
        .map_err(|s| anyhow::anyhow!("publishing the trust bundle: {}", s.message()))?
        .into_inner()
        .revision;
    if step == Step::Prune {
        for f in [&prev.cert, &prev.key] {
            if f.exists() {
                std::fs::remove_file(f)?;
            }
        }
    }
    Ok(format!(
        "site {}: trust bundle published (revision {revision}); {done}",
        state.site
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// A state dir in the middle of a rotation: current and next pairs.
    fn rotating(dir: &Path) -> (String, String) {
        let old = CertificateAuthority::generate("old").unwrap();
        let new = CertificateAuthority::generate("new").unwrap();
        let (c, n) = (files(dir, ""), files(dir, "-next"));
        old.save(&c.cert, &c.key).unwrap();
        new.save(&n.cert, &n.key).unwrap();
        (old.cert_pem, new.cert_pem)
    }

    #[test]
    fn finish_completes_after_a_cut_at_any_rename() {
        let (c, n, p) = (
            ("site-ca.pem", "site-ca-key.pem"),
            ("site-ca-next.pem", "site-ca-next-key.pem"),
            ("site-ca-prev.pem", "site-ca-prev-key.pem"),
        );
        // The renames `finish` does, in order (key first).
        let renames = [(c.1, p.1), (c.0, p.0), (n.1, c.1), (n.0, c.0)];
        for cut in 0..=renames.len() {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            let (old, new) = rotating(dir);
            for (from, to) in &renames[..cut] {
                std::fs::rename(dir.join(from), dir.join(to)).unwrap();
            }
            assert_eq!(
                finish_interrupted(dir),
                cut > 0 && cut < renames.len(),
                "cut after {cut} renames"
            );
            if cut == renames.len() {
                // Already finished: nothing under way any more.
                continue;
            }
            let (o, n2) = finish_files(dir).unwrap_or_else(|e| panic!("cut {cut}: {e:#}"));
            assert_eq!(
                (o.cert_pem, n2.cert_pem),
                (old.clone(), new.clone()),
                "cut {cut}"
            );
            assert_eq!(
                names(dir),
                [
                    "site-ca-key.pem",
                    "site-ca-prev-key.pem",
                    "site-ca-prev.pem",
                    "site-ca.pem"
                ],
                "cut {cut}"
            );
            let now = load(&files(dir, ""), "current").unwrap();
            assert_eq!(now.cert_pem, new, "cut {cut}: the new CA is current");
            let before = load(&files(dir, "-prev"), "previous").unwrap();
            assert_eq!(before.cert_pem, old, "cut {cut}: the old CA is kept");
            assert!(!finish_interrupted(dir));
        }
    }

    #[test]
    fn a_finish_that_cannot_load_both_cas_moves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        rotating(dir);
        std::fs::write(dir.join("site-ca-next-key.pem"), "garbage").unwrap();
        let before = names(dir);
        let Err(e) = finish_files(dir) else {
            panic!("a finish with a damaged new key went ahead")
        };
        assert!(format!("{e:#}").contains("new site CA"), "{e:#}");
        assert_eq!(names(dir), before);
    }
}
