//! tollgate: an API gateway configured by an NGINX-shaped `gateway.conf`.
//!
//! The pipeline, and the module that owns each step:
//!
//! ```text
//! gateway.conf ──parse──▶ AST (spans) ──validate──▶ Validated (typed settings, spans)
//!               config::parse        config::schema + validate      │
//!                                                                compile
//!                                                                  ▼
//!                     Gateway snapshot (no spans, no strings left to parse)
//!                     router + per-route pipelines + upstream pools
//!                                                                  │ Arc, swapped atomically
//!  client ──hyper──▶ server ──▶ router.lookup ──▶ pipeline ──▶ upstream pool ──▶ service
//!                                                                 proxy::client (own HTTP/1)
//! ```
//!
//! `config` imports no tokio, hyper or tower: it turns text into a
//! validated model or into diagnostics. `compile` turns the model into the
//! immutable [`gateway::Gateway`] snapshot, which `server` serves.
//!
//! The front end on its own, as `tollgate check` uses it:
//!
//! ```
//! use std::path::Path;
//! use tollgate::config::{diagnostics::Diagnostics, parse, validate};
//!
//! let text = b"upstream users { server 127.0.0.1:3001; }
//! server {
//!     listen 8080;
//!     location /api/users { proxy_pass http://user/users; }
//! }";
//! let mut diags = Diagnostics::new();
//! let loaded = parse::load_bytes(Path::new("gateway.conf"), text, &mut diags);
//! let config = validate::validate(&loaded, &|_| None, &mut diags);
//! assert!(config.is_none());
//! let d = diags.sorted().into_iter().find(|d| d.code == "unknown_upstream").unwrap();
//! assert_eq!(d.help.as_deref(), Some("did you mean `users`?"));
//! ```
//!
//! And the router NGINX's rules compile to:
//!
//! ```
//! use tollgate::compile::router::{Lookup, RouterBuilder, ServerNameSpec};
//! use tollgate::config::model::Modifier;
//!
//! let mut b = RouterBuilder::new();
//! let s = b.server(&[("127.0.0.1:8080".parse().unwrap(), true)], &[ServerNameSpec::Exact(String::new())]);
//! b.location(s, Modifier::Prefix, "/", false).unwrap();
//! b.location(s, Modifier::PrefixNoRegex, "/images/", false).unwrap();
//! b.location(s, Modifier::RegexCaseless, r"\.(gif|jpg)$", false).unwrap();
//! let router = b.build().unwrap();
//! // `^~` stops the regex search; elsewhere the regex wins over `/`.
//! assert!(matches!(router.lookup(s, "/images/1.gif"), Lookup::Found { location: 1, .. }));
//! assert!(matches!(router.lookup(s, "/docs/1.JPG"), Lookup::Found { location: 2, .. }));
//! ```

#[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
pub mod alloc;
pub mod compile;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod gateway;
pub mod observe;
pub mod policy;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod tls;

/// A hash map for the per-request, per-thread lookups (idle upstream
/// connections, metric handles): foldhash (hashbrown's own default) instead
/// of SipHash. Keys come from the config, never from clients, so the
/// DoS-resistance SipHash buys is not needed there.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
