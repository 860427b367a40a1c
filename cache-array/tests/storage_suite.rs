//! openraft's storage test suite, run against the sled log store and the state machine.

use cache_array::log_store::LogStore;
use cache_array::state_machine::StateMachineStore;
use cache_array::types::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, _) = LogStore::open(dir.path()).expect("open log store");
        let sm =
            StateMachineStore::open(&dir.path().join("snapshots"), Default::default()).expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes_on_the_sled_log_store() -> Result<(), StorageError> {
    Suite::test_all(SledBuilder)
}
