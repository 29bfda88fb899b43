//! TLS material, read when a config is checked or compiled: certificates
//! and keys from PEM files, the SNI certificate choice of each `ssl` listen
//! address, and the rustls configs for listeners and `https://` upstreams.
//!
//! Sync and socket-free (the handshakes live in `server` and `proxy`), so
//! that the checker can use the same loading code as the server: a
//! certificate `check` accepts is one `run` can serve. rustls runs on
//! aws-lc-rs, the crate's one crypto provider, TLS 1.2 and 1.3 only.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::compile::router::{Router, RouterBuilder, ServerNameSpec};
use crate::config::model::{Config, LocationSettings, ServerName, Tls};

/// Why TLS material could not be loaded. `Display` names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read `{}`: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{}` holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("`{}` is not valid PEM: {reason}", path.display())]
    BadPem { path: PathBuf, reason: String },
    #[error("`{}` holds no PEM private key", path.display())]
    NoKey { path: PathBuf },
    #[error("the key in `{}` is unusable: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("`{}` is not a usable certificate for the key in `{}`: {reason}", cert.display(), key.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsError {
    /// The file could not be opened at all (the checker reports that as
    /// `unreadable_file` already).
    pub fn is_unreadable(&self) -> bool {
        matches!(self, TlsError::Read { .. })
    }

    /// The error is about the key file rather than the certificate.
    pub fn is_key_problem(&self) -> bool {
        matches!(self, TlsError::NoKey { .. } | TlsError::BadKey { .. })
    }
}

/// The crypto provider everything TLS in the gateway uses.
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file, in order (leaf first for a chain).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_path_buf(),
        },
        e => TlsError::BadPem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
    })
}

/// A server's certificate chain and key, checked to belong together.
pub fn certified_key(tls: &Tls) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = load_certs(&tls.certificate)?;
    let key = load_key(&tls.key)?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::BadKey {
            path: tls.key.clone(),
            reason: e.to_string(),
        })?;
    let ck = CertifiedKey::new(certs, signing);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(ck))
        }
        Err(e) => Err(TlsError::Mismatch {
            cert: tls.certificate.clone(),
            key: tls.key.clone(),
            reason: match e {
                rustls::Error::InconsistentKeys(_) => {
                    "the key does not match the certificate".to_string()
                }
                e => e.to_string(),
            },
        }),
    }
}

// ------------------------------------------------------------ listeners

/// Picks the certificate for a ClientHello's SNI name with the NGINX server
/// selection of the router (exact, longest leading wildcard, longest
/// trailing wildcard, first regex, then the `default_server` or the first
/// server on the address), so the certificate and the serving `server` are
/// chosen by one rule.
#[derive(Debug)]
pub struct SniResolver {
    addr: SocketAddr,
    router: Router,
    /// Index = the router's server index.
    keys: Vec<Arc<CertifiedKey>>,
}

impl SniResolver {
    /// The certificate for an SNI name (`None` = no SNI, e.g. an IP).
    pub fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let host = sni.map(str::to_ascii_lowercase);
        let i = self
            .router
            .select_server(self.addr, Some(host.as_deref().unwrap_or("")))?;
        self.keys.get(i).cloned()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

/// The rustls config of every `ssl` listen address (certificates read now).
pub type ListenerConfigs = HashMap<SocketAddr, Arc<ServerConfig>>;

/// Build the TLS config of each `ssl` address from the servers on it.
pub fn listener_configs(config: &Config) -> Result<ListenerConfigs, TlsError> {
    // addr → (servers on it in order, any http2)
    let mut by_addr: HashMap<SocketAddr, (Vec<usize>, bool)> = HashMap::new();
    let mut order = Vec::new();
    for (si, s) in config.servers.iter().enumerate() {
        for l in s.listens.iter().filter(|l| l.ssl) {
            let e = by_addr.entry(l.addr).or_insert_with(|| {
                order.push(l.addr);
                (Vec::new(), false)
            });
            if !e.0.contains(&si) {
                e.0.push(si);
            }
            e.1 |= l.http2;
        }
    }
    let mut loaded: HashMap<&Tls, Arc<CertifiedKey>> = HashMap::new();
    let mut out = HashMap::new();
    for addr in order {
        let (servers, h2) = &by_addr[&addr];
        let mut b = RouterBuilder::new();
        let mut keys = Vec::new();
        for &si in servers {
            let s = &config.servers[si];
            let Some(tls) = &s.tls else { continue };
            let ck = match loaded.get(tls) {
                Some(ck) => ck.clone(),
                None => {
                    let ck = certified_key(tls)?;
                    loaded.insert(tls, ck.clone());
                    ck
                }
            };
            let default = s.listens.iter().any(|l| l.addr == addr && l.default_server);
            let mut names: Vec<ServerNameSpec> = s.names.iter().map(name_spec).collect();
            if names.is_empty() {
                names.push(ServerNameSpec::Exact(String::new()));
            }
            b.server(&[(addr, default)], &names);
            keys.push(ck);
        }
        if keys.is_empty() {
            continue;
        }
        let router = b
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let resolver = SniResolver { addr, router, keys };
        let mut sc = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        sc.alpn_protocols = if *h2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        out.insert(addr, Arc::new(sc));
    }
    Ok(out)
}

fn name_spec(n: &ServerName) -> ServerNameSpec {
    match n {
        ServerName::Exact(x) => ServerNameSpec::Exact(x.clone()),
        ServerName::LeadingWildcard(x) => ServerNameSpec::LeadingWildcard(x.clone()),
        ServerName::TrailingWildcard(x) => ServerNameSpec::TrailingWildcard(x.clone()),
        ServerName::Regex(r) => ServerNameSpec::Regex(r.clone()),
    }
}

// ------------------------------------------------------------ upstreams

/// Who an `https://` upstream must prove itself to: the system roots, or
/// the CAs of a `proxy_ssl_trusted_certificate` file.
#[derive(Debug)]
pub struct UpstreamTrust {
    /// The CA file; `None` = the system roots.
    pub path: Option<PathBuf>,
    /// Hash of the CA file's bytes: a reload that changes the file gets a
    /// new client (and pool); an unchanged one keeps its connections.
    pub fingerprint: u64,
    /// For clients that add their own ALPN (hyper-rustls: JWKS, OTLP).
    pub config: Arc<ClientConfig>,
    /// For upstream connections: the same, offering ALPN `http/1.1`
    /// (upstreams are spoken to over HTTP/1.1, LANGUAGE.md §4).
    pub upstream: Arc<ClientConfig>,
}

impl UpstreamTrust {
    fn new(path: Option<PathBuf>, fingerprint: u64, config: ClientConfig) -> UpstreamTrust {
        let mut upstream = config.clone();
        upstream.alpn_protocols = vec![b"http/1.1".to_vec()];
        UpstreamTrust {
            path,
            fingerprint,
            config: Arc::new(config),
            upstream: Arc::new(upstream),
        }
    }
}

fn client_config(roots: RootCertStore) -> ClientConfig {
    // No ALPN here: hyper-rustls (the JWKS and OTLP clients) adds its own
    // and refuses a config that has one; see [`UpstreamTrust::upstream`].
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .expect("aws-lc-rs supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// The CAs of a `proxy_ssl_trusted_certificate` file.
pub fn load_trust(path: &Path) -> Result<UpstreamTrust, TlsError> {
    let bytes = read(path)?;
    let certs = load_certs(path)?;
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| TlsError::BadPem {
            path: path.to_path_buf(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Ok(UpstreamTrust::new(
        Some(path.to_path_buf()),
        h.finish(),
        client_config(roots),
    ))
}

/// The operating system's trust store (read once per process). With none
/// found, every `https://` upstream fails verification (fail closed), and
/// that is logged.
pub fn system_trust() -> Arc<UpstreamTrust> {
    static T: OnceLock<Arc<UpstreamTrust>> = OnceLock::new();
    T.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "reading the system trust store");
        }
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::error!("no system CA certificates found: https upstreams will fail verification (install ca-certificates or set proxy_ssl_trusted_certificate)");
        }
        let config = client_config(roots);
        Arc::new(UpstreamTrust::new(None, 0, config))
    })
    .clone()
}

/// Every `proxy_ssl_trusted_certificate` file of a config, read now.
pub fn upstream_trust(config: &Config) -> Result<HashMap<PathBuf, Arc<UpstreamTrust>>, TlsError> {
    let mut out = HashMap::new();
    let all =
        std::iter::once(&config.defaults).chain(config.servers.iter().flat_map(|s| {
            std::iter::once(&s.settings).chain(s.locations.iter().map(|l| &l.settings))
        }));
    for settings in all {
        if let Some(p) = &settings.proxy_ssl_trusted_certificate
            && !out.contains_key(p)
        {
            out.insert(p.clone(), Arc::new(load_trust(p)?));
        }
    }
    Ok(out)
}

/// The TLS part of a gateway snapshot.
#[derive(Debug, Default)]
pub struct GatewayTls {
    /// Per `ssl` listen address.
    pub listeners: ListenerConfigs,
    /// Per `proxy_ssl_trusted_certificate` file.
    pub trust: HashMap<PathBuf, Arc<UpstreamTrust>>,
}

impl GatewayTls {
    pub fn load(config: &Config) -> Result<GatewayTls, TlsError> {
        Ok(GatewayTls {
            listeners: listener_configs(config)?,
            trust: upstream_trust(config)?,
        })
    }

    /// The trust an upstream request from a location is verified with.
    pub fn trust_for(&self, settings: &LocationSettings) -> Arc<UpstreamTrust> {
        match &settings.proxy_ssl_trusted_certificate {
            Some(p) => match self.trust.get(p) {
                Some(t) => t.clone(),
                // Compiled from the same config: never missing; fail closed.
                None => Arc::new(UpstreamTrust::new(
                    Some(p.clone()),
                    u64::MAX,
                    client_config(RootCertStore::empty()),
                )),
            },
            None => system_trust(),
        }
    }
}

/// The name an `https` upstream is verified against and sent as SNI:
/// the host of `written` (the server's `host:port` as written in the
/// config) when it is a DNS name, else the host connected to
/// (`connect_host`, an IP address or the `proxy_pass` host). The TCP
/// connection always goes to the address the pool chose; pooled
/// connections are keyed by address and name together.
pub fn upstream_server_name(connect_host: &str, written: &str) -> String {
    let name = host_of(written);
    if name.is_empty()
        || name
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok()
    {
        connect_host.trim_matches(['[', ']']).to_string()
    } else {
        name.to_string()
    }
}

fn host_of(hostport: &str) -> &str {
    if hostport.starts_with('[') {
        return hostport
            .split_once(']')
            .map(|(h, _)| &h[1..])
            .unwrap_or(hostport);
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => hostport,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_is_the_written_dns_name_else_the_address() {
        assert_eq!(upstream_server_name("10.0.0.1", "10.0.0.1:443"), "10.0.0.1");
        assert_eq!(
            upstream_server_name("127.0.0.1", "localhost:8443"),
            "localhost"
        );
        assert_eq!(
            upstream_server_name("10.0.0.1", "api.example.com:443"),
            "api.example.com"
        );
        assert_eq!(upstream_server_name("::1", "[::1]:443"), "::1");
        assert_eq!(upstream_server_name("[::1]", "[::1]:443"), "::1");
        for n in ["10.0.0.1", "localhost", "api.example.com", "::1"] {
            assert!(
                rustls_pki_types::ServerName::try_from(n).is_ok(),
                "{n} is a valid server name"
            );
        }
    }
}
