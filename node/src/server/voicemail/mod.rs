//! Voice messages (SPEC M): the node side of `chorus_actors::voicemail`. Work in progress
//! (issue 13): the message store is here; the upload path, the user actors and the
//! protocol follow.

pub mod store;
