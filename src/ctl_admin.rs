//! `causeway ctl admin`: admin credentials issued, listed, revoked and
//! renewed through the controllers, which record each one in Raft.

use std::path::{Path, PathBuf};

use anyhow::Context;
use causeway_api::identity::{self, Credential};
use causeway_api::pb;
use clap::Subcommand;

use crate::ctl::{CtlArgs, Output};

/// `ctl admin` subcommands.
#[derive(Subcommand)]
pub enum AdminCommand {
    /// Issue admin credential NAME into DIR (admin.pem, admin-key.pem and
    /// ca.pem: a directory `--creds` can point at). The key is made here
    /// and never sent; the controllers sign it and record it.
    Issue {
        /// The admin's name (its SPIFFE ID ends in /admin/NAME).
        name: String,
        /// Where to write it (created 0700).
        #[arg(long)]
        out: PathBuf,
        /// Lifetime, e.g. 12h or 30d (default and most: the controllers'
        /// admin_credential_lifetime_secs, 90 days unless configured).
        #[arg(long, value_parser = parse_lifetime)]
        lifetime: Option<u64>,
    },
    /// List the recorded admin credentials and whether each is active,
    /// revoked or expired.
    List,
    /// Revoke every credential of admin NAME on every RPC (never the last
    /// admin: issue another first).
    Revoke {
        /// The admin's name.
        name: String,
    },
    /// Replace the admin credential in --creds with a fresh one (new key,
    /// full lifetime); the old one stays valid until it expires.
    Renew,
}

/// `30d`, `12h`, `45m`, `90s` or plain seconds.
fn parse_lifetime(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?}: expected a number with s, m, h or d, e.g. 30d"))?;
    let per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit is s, m, h or d, e.g. 30d")),
    };
    n.checked_mul(per)
        .ok_or_else(|| format!("{text:?}: too long"))
}

/// Runs one `ctl admin` command.
pub async fn run(args: &CtlArgs, command: &AdminCommand) -> anyhow::Result<()> {
    let c = crate::ctl::client(args)?;
    let mut fed = c.federation().await?;
    let status = |s: tonic::Status| anyhow::anyhow!("{} ({:?})", s.message(), s.code());
    match command {
        AdminCommand::Issue {
            name,
            out,
            lifetime,
        } => {
            let (csr_pem, key_pem) = identity::generate_csr()?;
            let r = fed
                .issue_admin(pb::IssueAdminRequest {
                    name: name.clone(),
                    csr_pem,
                    lifetime_secs: lifetime.unwrap_or(0),
                })
                .await
                .map_err(status)?
                .into_inner();
            identity::private_dir(out)?;
            save(out, &r.cert_pem, &key_pem)?;
            identity::write(&out.join("ca.pem"), &r.controller_ca_pem, false)?;
            println!(
                "issued admin {name} into {} (sha256 {}, expires {}); list with `causeway ctl admin list`",
                out.display(),
                r.sha256,
                when(r.expires_at_unix_ms)
            );
        }
        AdminCommand::List => {
            let r = fed
                .list_admins(pb::ListAdminsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            print_admins(&r, args.output);
        }
        AdminCommand::Revoke { name } => {
            let r = fed
                .revoke_admin(pb::RevokeAdminRequest { name: name.clone() })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "revoked every credential of admin {name} (revision {})",
                r.revision
            );
        }
        AdminCommand::Renew => {
            let (csr_pem, key_pem) = identity::generate_csr()?;
            let r = fed
                .renew_credential(pb::RenewCredentialRequest { csr_pem })
                .await
                .map_err(status)?
                .into_inner();
            save(&args.api.creds, &r.cert_pem, &key_pem)?;
            println!(
                "renewed the admin credential in {} (expires {})",
                args.api.creds.display(),
                when(r.expires_at_unix_ms)
            );
        }
    }
    Ok(())
}

/// Writes `admin.pem` and `admin-key.pem` (0600) into `dir`, each
/// replaced atomically.
fn save(dir: &Path, cert_pem: &str, key_pem: &str) -> anyhow::Result<()> {
    Credential {
        cert_pem: cert_pem.to_string(),
        key_pem: key_pem.to_string(),
        chain: identity::parse_certs_pem("issued certificate", cert_pem)?,
    }
    .save(&dir.join("admin.pem"), &dir.join("admin-key.pem"))
    .with_context(|| format!("writing the credential into {}", dir.display()))
}

/// A time in ms since the epoch as UTC, to the second.
fn when(ms: u64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64) else {
        return format!("{ms} ms");
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn print_admins(r: &pb::ListAdminsResponse, output: Output) {
    if output == Output::Json {
        let list: Vec<_> = r
            .admins
            .iter()
            .map(|a| {
                serde_json::json!({"name": a.name, "sha256": a.sha256, "serial": a.serial,
                "issued_at_unix_ms": a.issued_at_unix_ms, "expires_at_unix_ms": a.expires_at_unix_ms,
                "issued_by": a.issued_by, "state": a.state})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"admins": list, "bootstrap": r.bootstrap})
        );
        return;
    }
    if r.bootstrap {
        println!("no admin credential is recorded yet: any the controller CA signed is accepted until the first is (`causeway ctl admin issue`)");
        return;
    }
    println!(
        "{:<16} {:<8} {:<21} {:<26} SHA256",
        "NAME", "STATE", "EXPIRES", "ISSUED BY"
    );
    for a in &r.admins {
        println!(
            "{:<16} {:<8} {:<21} {:<26} {}",
            a.name,
            a.state,
            when(a.expires_at_unix_ms),
            a.issued_by,
            a.sha256
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_read_with_their_units() {
        assert_eq!(parse_lifetime("90"), Ok(90));
        assert_eq!(parse_lifetime("45m"), Ok(2700));
        assert_eq!(parse_lifetime("12h"), Ok(43_200));
        assert_eq!(parse_lifetime("30d"), Ok(2_592_000));
        assert!(parse_lifetime("3w").unwrap_err().contains("s, m, h or d"));
        assert!(parse_lifetime("d").is_err());
        assert!(parse_lifetime("99999999999999999999d").is_err());
    }
}
