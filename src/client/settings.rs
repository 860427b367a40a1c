//! What a client is configured with: the URL list, the secret or credential, TLS, timeouts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::handshake::ClientIdentity;
use crate::protocol::{ConnectionRole, SOFTWARE_VERSION};

use super::{ClientError, NonstopSettings};

/// Settings of an [`ArrayClient`]; the defaults are those of Terracotta's client. Their `Debug`
/// never shows the secret.
#[derive(Clone)]
pub struct ClientSettings {
    /// `host:port` of array servers, tried in order for the config download.
    pub array_urls: Vec<String>,
    /// The array expected; `None` accepts whichever answers.
    pub array_name: Option<String>,
    /// Shared secret (empty when the array has none).
    pub secret: Vec<u8>,
    /// How long the URL list may take to yield the config before bootstrap fails.
    pub connect_timeout: Duration,
    /// Pause between rounds of connecting to the servers of the downloaded config.
    pub reconnect_wait_interval: Duration,
    /// Rounds of connecting to the config's servers before giving up; `None` waits forever.
    pub max_connect_retries: Option<u32>,
    /// Deadline of each operation unless a call gives its own.
    pub request_timeout: Duration,
    /// Software version announced in the handshake. Only tests change it, to provoke a mismatch.
    pub software_version: String,
    /// Name this client gives its sessions (shown in lock listings and server logs).
    pub client_name: String,
    /// How often the client renews its sessions and checks that the array answers; also how long
    /// it waits for each renewal before it reports itself disconnected.
    pub keepalive_interval: Duration,
    /// Nonstop settings of caches not listed in `nonstop`.
    pub default_nonstop: NonstopSettings,
    /// Nonstop settings by cache name.
    pub nonstop: HashMap<String, NonstopSettings>,
    /// Addresses to dial instead of the ones in the config (`config address -> address to use`),
    /// for clients that reach the array through port forwarding (and tests, through a fault proxy).
    pub address_map: HashMap<String, String>,
    /// A named credential of the array's credentials file (less than full access); `secret` is
    /// then that credential's secret. `None`: `secret` is the cluster secret.
    pub credential: Option<String>,
    /// TLS, when the array's ports speak it: the CA that signed the servers' certificates, and
    /// this client's own certificate when the array requires one.
    pub tls: Option<Arc<crate::tls::ClientTls>>,
}

impl std::fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSettings")
            .field("array_urls", &self.array_urls)
            .field("array_name", &self.array_name)
            .field("credential", &self.credential)
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .field("tls", &self.tls.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("client_name", &self.client_name)
            .finish_non_exhaustive()
    }
}

impl ClientSettings {
    /// Settings with defaults for a comma-separated URL list (`h1:9510,h2:9510`).
    pub fn new(array_urls: &str) -> Result<ClientSettings, ClientError> {
        let urls: Vec<String> = array_urls
            .split(',')
            .map(|u| u.trim())
            .filter(|u| !u.is_empty())
            .map(|u| u.strip_prefix("tcp://").unwrap_or(u).to_string())
            .collect();
        if urls.is_empty() {
            return Err(ClientError::Invalid("the array URL list is empty".into()));
        }
        for u in &urls {
            let ok = u
                .rsplit_once(':')
                .map(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                .unwrap_or(false);
            if !ok {
                return Err(ClientError::Invalid(format!("array URL `{u}` is not host:port")));
            }
        }
        Ok(ClientSettings {
            array_urls: urls,
            array_name: None,
            secret: Vec::new(),
            connect_timeout: Duration::from_secs(30),
            reconnect_wait_interval: Duration::from_secs(1),
            max_connect_retries: None,
            request_timeout: Duration::from_secs(30),
            software_version: SOFTWARE_VERSION.to_string(),
            client_name: format!("client-{}", std::process::id()),
            keepalive_interval: Duration::from_secs(1),
            default_nonstop: NonstopSettings::default(),
            nonstop: HashMap::new(),
            address_map: HashMap::new(),
            credential: None,
            tls: None,
        })
    }

    pub(super) fn identity(&self) -> ClientIdentity {
        ClientIdentity {
            software_version: self.software_version.clone(),
            array_name: self.array_name.clone(),
            secret: self.secret.clone(),
            role: match &self.credential {
                Some(name) => ConnectionRole::Credential { name: name.clone() },
                None => ConnectionRole::Client,
            },
            tls: self.tls.clone(),
        }
    }
}
