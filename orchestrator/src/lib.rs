//! sagad: a saga orchestrator. Sagas are event-sourced in Postgres, driven over gRPC, and
//! compensated newest first when a step is refused or cannot be got through.
//!
//! Data flows one way: `api` → `engine` → `saga` (the pure core) and `store` (all SQL).
//! `definition` parses and validates the saga definitions; `http` and `telemetry` are what
//! operators read (metrics, health, logs), and `explorer` the pages people read and act on.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod definition;
pub mod document;
pub mod engine;
pub mod explorer;
pub mod http;
pub mod limits;
pub mod saga;
pub mod store;
pub mod telemetry;
