//! The HTTP vocabulary every other layer speaks, and the client side of
//! the wire. Nothing here knows about routes, services or config.
//!
//! - [`body`]: the body types on the proxy path (request bodies as the
//!   listener hands them over, replayable bodies, guarded response bodies)
//! - [`headers`]: the mesh's wire conventions (`x-mesh-*`, ids, trace
//!   context, hop-by-hop headers, the destination of a request)
//! - [`error`]: the synthetic error vocabulary (`x-mesh-error` reasons,
//!   their statuses, JSON bodies and gRPC statuses)
//! - [`wire`]: HTTP/1 framing primitives shared by client and server
//! - [`h1`]: the HTTP/1.1 client codec; [`pool`]: its connections pooled
//!   per endpoint; [`limit`]: the connection limits they open under
//! - [`h2`]: the shared HTTP/2 upstream client
//! - [`tunnel`]: the byte tunnel for TCP routes, upgrades and `CONNECT`

pub mod body;
pub mod error;
pub(crate) mod h1;
pub mod h2;
pub mod headers;
pub mod limit;
pub mod pool;
pub mod tunnel;
pub(crate) mod wire;
