//! Voice messages (SPEC M1-M6), sans-IO: the cores the node's user actors and message
//! store run.
//!
//! - [`ogg`]: checks Opus in Ogg page by page as it arrives (no audio decoding).
//! - [`upload`]: one message's resumable chunked upload: offsets, idempotent repeats,
//!   page-aligned acknowledgement, bounds, the status the server decides.
//! - [`inbox`]: a user's inbox: gapless numbers, per-message state (upload status, read,
//!   play position) with versions, sync pages, conversation history.

pub mod inbox;
pub mod ogg;
pub mod upload;
