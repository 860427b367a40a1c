//! The chaos suite: array servers and integration nodes as real processes in their own network
//! namespaces, real link cuts, crashes and pauses, histories checked for linearizability, lost
//! writes, split brain and session continuity. See docs/reliability.md.
//!
//! Needs root (network namespaces). Without it the scenarios say so loudly and skip; with
//! `CI=true` that is a failure. The checkers' own tests run anywhere.

#[path = "../common/mod.rs"]
mod common;

mod checkers;
mod cluster;
mod history;
mod netns;
mod proxy;
mod run;
mod scenarios;
mod splitbrain;
mod workload;
