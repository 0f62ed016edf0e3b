//! Voice messages (SPEC M): the node side of `chorus_actors::voicemail`: user actors,
//! uploads, the replicated message store, delivery and the HTTP range endpoint.
//!
//! - `store.rs`: `MessageStore` (records and page-aligned audio in sled) and `UserStore`
//!   (user actors' fenced copies).
//! - `messages.rs`: what nodes say to each other (`Domain::Voice`), `VoiceError`.
//! - `service.rs`: `Voicemail`: routing to owners, user actors, uploads, fetches,
//!   notifications, upkeep.
//! - `http.rs`: `GET /vm/<id>` with `Range`.

pub mod http;
pub mod messages;
pub mod service;
pub mod store;
