//! The engine's tokio runtime on threads of its own. One worker uses a current-thread runtime
//! (no work-stealing or cross-thread wake-ups on the request path); more use the multi-thread one.

use std::io;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

pub struct EngineRuntime {
    handle: Handle,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl EngineRuntime {
    pub fn start(worker_threads: usize) -> io::Result<EngineRuntime> {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("meshctl-engine".into()).spawn(move || {
            let built = if worker_threads <= 1 {
                Builder::new_current_thread().enable_all().build()
            } else {
                Builder::new_multi_thread().worker_threads(worker_threads).thread_name("meshctl-worker").enable_all().build()
            };
            let runtime = match built {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = handle_tx.send(Err(e));
                    return;
                }
            };
            let _ = handle_tx.send(Ok(runtime.handle().clone()));
            // This thread drives the current-thread runtime until told to stop.
            runtime.block_on(async {
                let _ = stop_rx.await;
            });
            runtime.shutdown_timeout(Duration::from_millis(100));
        })?;
        let handle = handle_rx
            .recv()
            .map_err(|_| io::Error::other("the engine runtime thread exited while starting"))??;
        Ok(EngineRuntime { handle, stop: Mutex::new(Some(stop_tx)), thread: Mutex::new(Some(thread)) })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Stop the runtime and wait for its thread; tasks still running are dropped.
    pub fn shutdown(&self) {
        if let Some(stop) = self.stop.lock().unwrap().take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.lock().unwrap().take() {
            let _ = thread.join();
        }
    }
}

impl Drop for EngineRuntime {
    fn drop(&mut self) {
        self.shutdown();
    }
}
