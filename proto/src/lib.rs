//! Everything a client of lmsd needs: the wire types, NDJSON framing, error codes and a small client.
//!
//! The protocol is documented in `proto/PROTOCOL.md`, which is also this crate's top-level doc.
#![doc = include_str!("../PROTOCOL.md")]

pub mod client;
pub mod codec;
pub mod error;
pub mod message;
pub mod paths;
pub mod task;

pub mod ttl;

pub use client::{Client, ClientError};
pub use error::{ErrorCode, InvalidOutput, WireError};
pub use message::*;
pub use task::*;

pub use ttl::Ttl;

/// The protocol version this crate speaks. Additive changes (new optional fields, new variants)
/// keep it; anything else bumps it.
pub const PROTOCOL_VERSION: u32 = 1;
