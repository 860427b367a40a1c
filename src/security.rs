//! Secrets, credentials and what a connection may do (docs/security.md).
//!
//! Three kinds of secret exist, each in its own file:
//! - the **cluster secret** (`security.secret_file`): a client proving it has full access;
//! - the **peer secret** (`security.peer_secret_file`): the servers of the array prove it to each
//!   other on the group port; no client holds it, so no client credential reaches the Raft layer;
//! - **credentials** (`security.credentials_file`): named client secrets with read or read-write
//!   access to caches by name prefix, for clients that should not have full access (an integration
//!   node, a reporting job).
//!
//! Secrets are compared in constant time and never logged; files holding them are written 0600.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Shortest secret accepted, in bytes (128 bits when random).
pub const SECRET_MIN_BYTES: usize = 16;

/// Longest credential name.
pub const CREDENTIAL_NAME_BYTES_MAX: usize = 64;

/// Access rules one credential may have at most.
pub const ACCESS_RULES_MAX: usize = 256;

/// Compares two byte strings in constant time (for equal lengths; the length itself is not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Why a secret or credentials file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The content is not acceptable.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong (never the secret itself).
        reason: String,
    },
}

/// Reads a secret file: its content without surrounding whitespace, at least
/// [`SECRET_MIN_BYTES`] long.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, SecretError> {
    let bytes = std::fs::read(path).map_err(|source| SecretError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let secret = bytes.trim_ascii().to_vec();
    if secret.len() < SECRET_MIN_BYTES {
        return Err(SecretError::Invalid {
            path: path.to_path_buf(),
            reason: format!("holds fewer than {SECRET_MIN_BYTES} bytes; use a long random secret"),
        });
    }
    Ok(secret)
}

/// A fresh random secret as hex text (32 random bytes from the operating system's CSPRNG).
pub fn new_secret_hex() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a file only its owner may read (0600), replacing any. The bytes go to a temporary
/// file in the same folder that is then renamed over `path`, so a reader sees the old contents
/// or the new ones, never a half-written file (`ferrocotta up` rewrites endpoints.json while
/// scripts read it).
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a file path is needed"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    // A leftover of a crashed writer with this pid could have any mode: start afresh.
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// What a credential may do with the caches whose names start with `prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessMode {
    /// Reads only: get, contains, keys, size, list locks.
    Read,
    /// Reads and writes, locks and sessions.
    ReadWrite,
}

/// One access rule of a credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// Cache names starting with this (`""`: every cache).
    pub prefix: String,
    /// What is allowed.
    pub mode: AccessMode,
}

/// One named client credential.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// Name the client states in its hello.
    pub name: String,
    /// The secret it proves (at least [`SECRET_MIN_BYTES`] bytes).
    pub secret: String,
    /// What it may do; a cache no rule matches is out of reach.
    #[serde(default)]
    pub access: Vec<AccessRule>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("Credential")
            .field("name", &self.name)
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

/// The credentials file: `[[credential]]` tables.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsFile {
    /// The credentials.
    #[serde(default)]
    pub credential: Vec<Credential>,
}

/// Credentials by name, as a server checks them.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    by_name: HashMap<String, Credential>,
}

impl Credentials {
    /// Reads and validates a credentials file.
    pub fn load(path: &Path) -> Result<Credentials, SecretError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| SecretError::Invalid {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parses and validates the text of a credentials file; the error names the credential.
    pub fn parse(text: &str) -> Result<Credentials, String> {
        let file: CredentialsFile = toml::from_str(text).map_err(|e| format!("not a valid credentials file: {e}"))?;
        let mut by_name = HashMap::new();
        for (i, c) in file.credential.into_iter().enumerate() {
            let at = format!("credential[{i}]");
            check_credential_name(&c.name).map_err(|e| format!("{at}.name: {e}"))?;
            if c.secret.trim().len() < SECRET_MIN_BYTES {
                return Err(format!(
                    "{at} (`{}`).secret: fewer than {SECRET_MIN_BYTES} bytes",
                    c.name
                ));
            }
            if c.access.len() > ACCESS_RULES_MAX {
                return Err(format!("{at}.access: at most {ACCESS_RULES_MAX} rules"));
            }
            if by_name.contains_key(&c.name) {
                return Err(format!("{at}.name: `{}` is used twice", c.name));
            }
            by_name.insert(c.name.clone(), c);
        }
        Ok(Credentials { by_name })
    }

    /// The secret of a credential (for the handshake), if it exists.
    pub fn secret_of(&self, name: &str) -> Option<Vec<u8>> {
        self.by_name.get(name).map(|c| c.secret.trim().as_bytes().to_vec())
    }

    /// What a connection with this credential may do.
    pub fn grant_of(&self, name: &str) -> Option<Grant> {
        self.by_name.get(name).map(|c| Grant::Limited {
            credential: Arc::from(c.name.as_str()),
            rules: Arc::from(c.access.clone()),
        })
    }

    /// Number of credentials.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// Whether a credential name is acceptable: 1 to [`CREDENTIAL_NAME_BYTES_MAX`] of ASCII letters,
/// digits, `-`, `_` and `.` (it names the sessions the credential opens, as `name/client`).
pub fn check_credential_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > CREDENTIAL_NAME_BYTES_MAX {
        return Err(format!("must be 1 to {CREDENTIAL_NAME_BYTES_MAX} characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err("may hold only ASCII letters, digits, `-`, `_` and `.`".into());
    }
    Ok(())
}

/// What one authenticated connection may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// The cluster secret: everything.
    Full,
    /// A named credential: what its rules allow.
    Limited {
        /// The credential's name.
        credential: Arc<str>,
        /// Its rules.
        rules: Arc<[AccessRule]>,
    },
}

impl Grant {
    /// Whether the connection may read `cache`.
    pub fn may_read(&self, cache: &str) -> bool {
        match self {
            Grant::Full => true,
            Grant::Limited { rules, .. } => rules.iter().any(|r| cache.starts_with(&r.prefix)),
        }
    }

    /// Whether the connection may write (and lock) `cache`.
    pub fn may_write(&self, cache: &str) -> bool {
        match self {
            Grant::Full => true,
            Grant::Limited { rules, .. } => rules
                .iter()
                .any(|r| r.mode == AccessMode::ReadWrite && cache.starts_with(&r.prefix)),
        }
    }

    /// Whether the connection may open sessions (they write the log): only with write access
    /// somewhere.
    pub fn may_open_sessions(&self) -> bool {
        match self {
            Grant::Full => true,
            Grant::Limited { rules, .. } => rules.iter().any(|r| r.mode == AccessMode::ReadWrite),
        }
    }

    /// The credential's name, `None` for full access.
    pub fn credential(&self) -> Option<&str> {
        match self {
            Grant::Full => None,
            Grant::Limited { credential, .. } => Some(credential),
        }
    }

    /// The client name a session opened on this connection gets: a credential's sessions are
    /// named `credential/client`, which is how the array knows whose session it is.
    pub fn session_name(&self, client_name: &str) -> String {
        match self.credential() {
            None => client_name.to_string(),
            Some(c) => format!("{c}/{client_name}"),
        }
    }

    /// Whether a session with this client name belongs to the connection (full access owns all).
    pub fn owns_session(&self, session_client_name: &str) -> bool {
        match self.credential() {
            None => true,
            Some(c) => session_client_name
                .strip_prefix(c)
                .is_some_and(|rest| rest.starts_with('/')),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_file_is_replaced_whole_and_only_its_owner_may_read_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("endpoints.json");
        std::fs::write(&path, "old contents, readable by all").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private_file(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("endpoints.json")]);
    }

    const FILE: &str = r#"
[[credential]]
name = "reports"
secret = "0123456789abcdef0123"
access = [{ prefix = "reports.", mode = "read" }]

[[credential]]
name = "node"
secret = "fedcba9876543210fedc"
access = [{ prefix = "ferrocotta.node.", mode = "read_write" }, { prefix = "", mode = "read" }]
"#;

    #[test]
    fn rules_grant_reads_and_writes_by_prefix() {
        let c = Credentials::parse(FILE).unwrap();
        let reports = c.grant_of("reports").unwrap();
        assert!(reports.may_read("reports.daily"));
        assert!(!reports.may_read("orders"));
        assert!(!reports.may_write("reports.daily"));
        assert!(!reports.may_open_sessions());
        let node = c.grant_of("node").unwrap();
        assert!(node.may_write("ferrocotta.node.sessions.x"));
        assert!(!node.may_write("orders"));
        assert!(node.may_read("orders"));
        assert!(node.may_open_sessions());
        assert_eq!(c.secret_of("node").unwrap(), b"fedcba9876543210fedc");
        assert!(c.grant_of("nobody").is_none());
    }

    #[test]
    fn sessions_are_owned_by_their_credential() {
        let c = Credentials::parse(FILE).unwrap();
        let node = c.grant_of("node").unwrap();
        assert_eq!(node.session_name("integration-node x"), "node/integration-node x");
        assert!(node.owns_session("node/integration-node x"));
        assert!(!node.owns_session("nodes/x"));
        assert!(!node.owns_session("integration-node x"));
        assert!(Grant::Full.owns_session("anything"));
    }

    #[test]
    fn bad_files_name_the_credential_and_never_the_secret() {
        let short = FILE.replace("0123456789abcdef0123", "short");
        let err = Credentials::parse(&short).unwrap_err();
        assert!(err.contains("credential[0]") && !err.contains("short\""), "{err}");
        let slash = FILE.replace("name = \"node\"", "name = \"no/de\"");
        assert!(Credentials::parse(&slash).unwrap_err().contains("credential[1].name"));
        let twice = FILE.replace("name = \"node\"", "name = \"reports\"");
        assert!(Credentials::parse(&twice).unwrap_err().contains("used twice"));
        let shown = format!("{:?}", Credentials::parse(FILE).unwrap());
        assert!(!shown.contains("0123456789abcdef0123"), "{shown}");
    }

    #[test]
    fn equal_only_when_equal() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
