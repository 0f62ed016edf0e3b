//! The admin side: `/admin/*` routes, readiness.

pub mod readiness;
pub mod routes;
