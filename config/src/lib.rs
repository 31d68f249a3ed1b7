//! Meshgate's config model and everything that moves it: the serde types
//! ([`model`]), their validation with field paths ([`validate`]), the
//! [`store::ConfigStore`] trait with its etcd and standalone-file stores, the
//! sync engine that keeps a process's view current through outages
//! ([`sync`]), lease-based registration ([`registration`]) and the
//! last-known-good snapshot file ([`snapshot_file`]), and the bearer tokens
//! of the admin API and the ops port ([`tokens`]), and TLS material:
//! certificates and keys parsed, checked and described ([`tls`]).

#![forbid(unsafe_code)]

pub mod jwt;
pub mod key;
pub mod model;
pub mod node;
pub mod registration;
pub mod snapshot_file;
pub mod store;
pub mod sync;
pub mod tls;
pub mod tokens;
pub mod validate;

pub use key::{Key, Kind};
pub use validate::{FieldError, Invalid, Object};
