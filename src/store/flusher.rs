//! Group commit: one task owns `sled::Db::flush`, so it never runs concurrently (sled's
//! `flush_async` is reported to deadlock when it does, sled issue 1308), and one flush serves
//! every shard worker that asked while the previous one ran.

use tokio::sync::{mpsc, oneshot};

use super::{Store, StoreError};

type Waiter = oneshot::Sender<Result<(), String>>;

/// Handle to the flusher task. Cheap to clone.
#[derive(Clone)]
pub struct GroupFlusher {
    requests: mpsc::Sender<Waiter>,
}

impl GroupFlusher {
    /// Starts the flusher task. It ends when every handle is dropped; its handle says when,
    /// so a stopping instance can wait until nothing holds the data dir any more.
    pub fn spawn(store: Store) -> (GroupFlusher, tokio::task::JoinHandle<()>) {
        let (requests, mut incoming) = mpsc::channel::<Waiter>(1024);
        let task = tokio::spawn(async move {
            while let Some(first) = incoming.recv().await {
                let mut waiters = vec![first];
                while let Ok(next) = incoming.try_recv() {
                    waiters.push(next);
                }
                let store = store.clone();
                let result = tokio::task::spawn_blocking(move || store.flush())
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map(|_| ()).map_err(|e| e.to_string()));
                for waiter in waiters {
                    // A waiter that gave up is fine to ignore.
                    let _ = waiter.send(result.clone());
                }
            }
        });
        (GroupFlusher { requests }, task)
    }

    /// Returns once everything applied before the call is on disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        let gone = || StoreError::Flush("the flusher task stopped".into());
        self.requests.send(done).await.map_err(|_| gone())?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(StoreError::Flush(message)),
            Err(_) => Err(gone()),
        }
    }
}
