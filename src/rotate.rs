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

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use causeway_api::identity::CertificateAuthority;
use causeway_api::pb;
use causeway_gateway::site::SiteState;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Step {
    Start,
    Finish,
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
    if !current.cert.exists() {
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
            let old = load(&current, "current")?;
            let new = load(&next, "new")?;
            // The key first: a crash in between leaves the old pair whole
            // under its old name or the new pair under the new one.
            std::fs::rename(&current.key, &prev.key)?;
            std::fs::rename(&current.cert, &prev.cert)?;
            std::fs::rename(&next.key, &current.key)?;
            std::fs::rename(&next.cert, &current.cert)?;
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
