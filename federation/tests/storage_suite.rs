//! openraft's storage conformance suite, run against the segment-file log
//! store and the catalog state machine.

use causeway_federation::hub::Hub;
use causeway_federation::store::{self, LogStore, StateMachine};
use causeway_federation::{NodeId, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = store::open(dir.path()).expect("open store");
        let sm = StateMachine::new(storage.db.clone(), Hub::new()).expect("state machine");
        Ok((dir, storage.log, sm))
    }
}

#[test]
fn log_store_passes_the_openraft_suite() {
    if let Err(e) = Suite::test_all(Builder) {
        panic!("storage conformance failed: {e}");
    }
}
