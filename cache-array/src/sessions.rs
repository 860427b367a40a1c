//! Client sessions in the replicated store (SPEC 2.5).
//!
//! A session is opened through the log and its id is the index of that entry, so ids are unique
//! per stripe and equal on every server. Keep-alives do not go through the log: the active tracks
//! them in memory (see `upkeep`) and proposes `ExpireSessions` for the silent ones. Ending a session
//! (expiry or close) releases its locks, drops it from lock queues and removes its ephemeral
//! entries, identically on every server.

use std::collections::BTreeSet;

use ferrocotta::protocol::Reply;

use crate::store::{ApplyContext, Session, Store};

impl Store {
    /// Opens a session (an `OpenSession` entry), of the client `client_id` if it gave one.
    pub fn open_session(&mut self, client_name: &str, client_id: Option<u64>, ctx: &ApplyContext) -> Reply {
        if let Some(client) = client_id {
            self.session_clients.insert(ctx.index, client);
        }
        self.sessions.insert(
            ctx.index,
            Session {
                client_name: client_name.to_string(),
                opened_ms: ctx.now_ms,
                ephemeral: BTreeSet::new(),
                locks: BTreeSet::new(),
            },
        );
        Reply::Session {
            id: ctx.index,
            reconnect_window_ms: 0,
        }
    }

    /// Ends a session: its locks are released (waiters granted in order), its queue places
    /// dropped, its ephemeral entries removed. Unknown ids are ignored.
    pub fn end_session(&mut self, id: u64, ctx: &mut ApplyContext) -> bool {
        let Some(session) = self.sessions.remove(&id) else {
            return false;
        };
        self.session_clients.remove(&id);
        for (cache, key) in session.ephemeral {
            let owned = self
                .caches
                .get(&cache)
                .and_then(|c| c.entries.get(&key))
                .is_some_and(|e| e.owner == Some(id));
            if owned {
                self.remove_entry(&cache, &key);
            }
        }
        for (cache, key) in session.locks {
            self.release_all(&cache, &key, id, ctx);
        }
        true
    }

    /// The live session of the client `client` on this stripe (its latest, should a rejoin have
    /// left two).
    pub fn session_of_client(&self, client: u64) -> Option<u64> {
        self.session_clients
            .iter()
            .rev()
            .find(|(id, c)| **c == client && self.sessions.contains_key(id))
            .map(|(id, _)| *id)
    }
}
