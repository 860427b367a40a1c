//! Cluster and logical names (SPEC 4.1).
//!
//! The effective cluster name replaces periods with underscores (cache names use periods as
//! separators); a name longer than 32 characters becomes its first 20 characters plus a hash of
//! the whole name, so long names stay distinct. Logical names must be unique among live members
//! and may not contain `;` (the member list's separator in the seed's tools).

use sha2::{Digest, Sha256};

/// Longest effective cluster name.
pub const CLUSTER_NAME_MAX: usize = 32;

/// Characters of a long name kept before the hash.
const KEPT_PREFIX: usize = 20;

/// The effective cluster name.
pub fn effective_cluster_name(name: &str) -> String {
    let replaced = name.replace('.', "_");
    if replaced.chars().count() <= CLUSTER_NAME_MAX {
        return replaced;
    }
    let prefix: String = replaced.chars().take(KEPT_PREFIX).collect();
    let digest = Sha256::digest(name.as_bytes());
    let hash: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hash}")
}

/// Checks a cluster name given on the command line or in node.toml.
pub fn validate_cluster_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("the cluster name must not be empty".into());
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "the cluster name `{name}` contains spaces or control characters"
        ));
    }
    Ok(())
}

/// Checks a logical name.
pub fn validate_logical_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err("the logical name must be 1 to 128 characters".into());
    }
    if name.contains(';') {
        return Err(format!("the logical name `{name}` contains `;`, which is not allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_become_underscores() {
        assert_eq!(effective_cluster_name("my.cluster.prod"), "my_cluster_prod");
    }

    #[test]
    fn long_names_keep_twenty_characters_and_a_hash() {
        let long = "com.example.integration.production.cluster.eu-west";
        let eff = effective_cluster_name(long);
        assert!(eff.starts_with("com_example_integrat"), "{eff}");
        assert_eq!(eff.chars().count(), 32);
        assert_ne!(
            eff,
            effective_cluster_name("com.example.integration.production.cluster.us-east")
        );
        assert_eq!(eff, effective_cluster_name(long), "stable");
    }

    #[test]
    fn logical_names_refuse_semicolons() {
        assert!(validate_logical_name("node;1").is_err());
        assert!(validate_logical_name("host:5555").is_ok());
    }
}
