//! Bearer-token auth for the admin API: the tokens and roles are
//! [`meshgate_config::tokens`] (shared with the ops port of gateways and
//! sidecars); the check of each request is [`crate::router`]'s middleware.

pub use meshgate_config::tokens::{Caller, Role, Tokens};
