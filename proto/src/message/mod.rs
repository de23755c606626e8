//! Request, reply and event types: one named payload struct per variant. `request` holds what
//! clients ask, `reply` what lmsd answers, `event` what it reports on the way, `status` the
//! `status` result, and `parse` reads a request line.

mod batch;
mod event;
mod parse;
mod reply;
mod request;
mod status;
#[cfg(test)]
mod tests;

pub use event::*;
pub use parse::*;
pub use reply::*;
pub use request::*;
pub use status::*;
