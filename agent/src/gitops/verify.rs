//! Commit signature verification, in process: the commit object without its
//! `gpgsig` header is checked against an SSH signature (`SshSig`, namespace
//! "git", as `git -c gpg.format=ssh commit -S` makes) by one of the allowed
//! ed25519 keys. No `ssh-keygen` or `gpg` program is run.
//!
//! OpenPGP signatures are not supported in this build (the `pgp` crate would
//! add a large RSA/ECC tree for a case the seeds do not use): an OpenPGP key
//! in `allowed_signers` is refused at config check, and an OpenPGP-signed
//! head is reported as not verifiable and not applied.

use ssh_key::{PublicKey, SshSig};

/// The namespace git signs commits in.
pub const GIT_NAMESPACE: &str = "git";

/// Parses one `allowed_signers` entry: `[principal] ssh-ed25519 AAAA... [comment]`.
pub fn parse_allowed_signer(entry: &str) -> Result<PublicKey, String> {
    let trimmed = entry.trim();
    if trimmed.contains("BEGIN PGP") || trimmed.to_ascii_lowercase().starts_with("openpgp") {
        return Err("OpenPGP keys are not supported in this build; sign commits with an SSH ed25519 key (git -c gpg.format=ssh)".into());
    }
    let tokens: Vec<&str> = trimmed.split_whitespace().collect();
    let Some(at) = tokens
        .iter()
        .position(|t| t.starts_with("ssh-") || t.starts_with("ecdsa-") || t.starts_with("sk-"))
    else {
        return Err(format!(
            "{trimmed:?} is not an OpenSSH public key (expected \"ssh-ed25519 AAAA... comment\")"
        ));
    };
    if tokens[at] != "ssh-ed25519" {
        return Err(format!(
            "key type {} is not supported; use an ed25519 key (ssh-keygen -t ed25519)",
            tokens[at]
        ));
    }
    let Some(blob) = tokens.get(at + 1) else {
        return Err("the key has no base64 part".into());
    };
    PublicKey::from_openssh(&format!("{} {}", tokens[at], blob)).map_err(|err| format!("cannot parse the key: {err}"))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("commit {0} is not signed")]
    Unsigned(String),
    #[error("commit {commit} carries an OpenPGP signature; only SSH signatures can be verified in this build")]
    OpenPgp { commit: String },
    #[error("commit {commit}: unreadable signature: {reason}")]
    Malformed { commit: String, reason: String },
    #[error("commit {commit} is signed by {key}, which is not in gitops.verify.allowed_signers")]
    UnknownSigner { commit: String, key: String },
    #[error("commit {commit}: the signature does not match the commit ({reason})")]
    BadSignature { commit: String, reason: String },
}

/// Checks `signature` (the armored `gpgsig` header) over `payload` (the
/// commit object without that header).
pub fn verify_commit(
    commit: &str,
    signature: Option<&[u8]>,
    payload: &[u8],
    allowed: &[PublicKey],
) -> Result<String, VerifyError> {
    let Some(signature) = signature else {
        return Err(VerifyError::Unsigned(commit.to_string()));
    };
    let text = String::from_utf8_lossy(signature);
    if text.contains("BEGIN PGP SIGNATURE") {
        return Err(VerifyError::OpenPgp {
            commit: commit.to_string(),
        });
    }
    let sig = SshSig::from_pem(text.trim().as_bytes()).map_err(|err| VerifyError::Malformed {
        commit: commit.to_string(),
        reason: err.to_string(),
    })?;
    let signer = PublicKey::from(sig.public_key().clone());
    let fingerprint = signer.fingerprint(ssh_key::HashAlg::Sha256).to_string();
    let Some(key) = allowed.iter().find(|k| k.key_data() == sig.public_key()) else {
        return Err(VerifyError::UnknownSigner {
            commit: commit.to_string(),
            key: fingerprint,
        });
    };
    key.verify(GIT_NAMESPACE, payload, &sig)
        .map_err(|err| VerifyError::BadSignature {
            commit: commit.to_string(),
            reason: err.to_string(),
        })?;
    Ok(fingerprint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_allowed_signers_lines_and_refuses_others() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKy//2pe5ltybIX2SayVgn0ALgUmqeFat23E0ciIcEna ops@example";
        assert!(parse_allowed_signer(key).is_ok());
        assert!(parse_allowed_signer(&format!("ops@example {key}")).is_ok());
        assert!(parse_allowed_signer("openpgp:ABCDEF").unwrap_err().contains("OpenPGP"));
        assert!(parse_allowed_signer("ssh-rsa AAAAB3NzaC1yc2E= x")
            .unwrap_err()
            .contains("ed25519"));
        assert!(parse_allowed_signer("hello").is_err());
    }

    #[test]
    fn unsigned_and_pgp_heads_are_refused() {
        assert_eq!(
            verify_commit("abc", None, b"tree x\n", &[]),
            Err(VerifyError::Unsigned("abc".into()))
        );
        let pgp = b"-----BEGIN PGP SIGNATURE-----\nxx\n-----END PGP SIGNATURE-----";
        assert!(matches!(
            verify_commit("abc", Some(pgp), b"tree x\n", &[]),
            Err(VerifyError::OpenPgp { .. })
        ));
    }
}
