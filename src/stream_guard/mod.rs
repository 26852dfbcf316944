//! Work in progress.

mod sse;
