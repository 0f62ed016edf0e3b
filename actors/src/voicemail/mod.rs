//! Voice messages (SPEC M1-M6), sans-IO: the cores the node's user actors and message
//! store run.
//!
//! - [`ogg`]: checks Opus in Ogg page by page as it arrives (no audio decoding).
//! - [`upload`]: one message's resumable chunked upload: offsets, idempotent repeats,
//!   page-aligned acknowledgement, bounds, the status the server decides.
//! - [`inbox`]: a user's inbox: gapless numbers, per-message state (upload status, read,
//!   play position) with versions, sync pages, conversation history.
//! - [`user`]: a user actor's state (the inbox behind a revision), the operations that
//!   change it, and the fenced copies nodes keep of it.
//! - [`wire`]: these types as the protocol shows them.

pub mod inbox;
pub mod ogg;
pub mod upload;
pub mod user;
pub mod wire;
