//! The background flusher for logs with an `interval(ms)` flush policy.

use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::log::PartitionLog;

/// How often the flusher looks at its logs; bounds how late an interval
/// flush can be.
const TICK: Duration = Duration::from_millis(5);

struct Shared {
    logs: Mutex<Vec<Weak<PartitionLog>>>,
    stopping: Mutex<bool>,
    wake: Condvar,
}

/// A thread that syncs every registered log whose flush interval has
/// passed. Logs are held weakly: dropping a log unregisters it.
pub struct IntervalFlusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl IntervalFlusher {
    pub fn start() -> IntervalFlusher {
        let shared = Arc::new(Shared {
            logs: Mutex::new(Vec::new()),
            stopping: Mutex::new(false),
            wake: Condvar::new(),
        });
        let thread = std::thread::Builder::new()
            .name("sluice-flusher".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || run(&shared)
            })
            .expect("spawn the flusher thread");
        IntervalFlusher {
            shared,
            thread: Some(thread),
        }
    }

    pub fn register(&self, log: &Arc<PartitionLog>) {
        self.shared.logs.lock().push(Arc::downgrade(log));
    }
}

fn run(shared: &Shared) {
    loop {
        {
            let mut stopping = shared.stopping.lock();
            if *stopping {
                return;
            }
            shared.wake.wait_for(&mut stopping, TICK);
            if *stopping {
                return;
            }
        }
        let logs: Vec<Arc<PartitionLog>> = {
            let mut logs = shared.logs.lock();
            logs.retain(|w| w.strong_count() > 0);
            logs.iter().filter_map(Weak::upgrade).collect()
        };
        let now = Instant::now();
        for log in logs {
            if log.flush_due(now) == Some(true)
                && let Err(error) = log.flush()
            {
                tracing::error!(dir = %log.dir().display(), %error, "interval flush failed");
            }
        }
    }
}

impl Drop for IntervalFlusher {
    fn drop(&mut self) {
        *self.shared.stopping.lock() = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
