//! The controller CA and admin credentials: `causeway ca init` and what
//! the local federation creates for itself.

use std::path::Path;

use causeway_api::identity::{CertificateAuthority, Credential};

/// Creates the controller CA and an admin credential named `admin_name` in
/// `dir` (refusing to overwrite a CA already there).
pub fn ca_init(dir: &Path, admin_name: &str) -> anyhow::Result<()> {
    causeway_api::identity::private_dir(dir)?;
    if dir.join("ca-key.pem").exists() {
        anyhow::bail!(
            "{} already holds a CA; refusing to overwrite it",
            dir.display()
        );
    }
    let ca = CertificateAuthority::generate("causeway controller CA")?;
    ca.save(&dir.join("ca.pem"), &dir.join("ca-key.pem"))?;
    let admin = issue_admin(&ca, admin_name)?;
    admin.save(&dir.join("admin.pem"), &dir.join("admin-key.pem"))?;
    Ok(())
}

/// An admin credential (`spiffe://controller.causeway/admin/<name>`) for a
/// year, signed by the controller CA.
pub fn issue_admin(ca: &CertificateAuthority, name: &str) -> anyhow::Result<Credential> {
    let id = causeway_api::model::SpiffeId::new(
        causeway_api::identity::controller_trust_domain(),
        &format!("/admin/{name}"),
    )?;
    Ok(ca.issue(&id, &[], std::time::Duration::from_secs(365 * 86400))?)
}
