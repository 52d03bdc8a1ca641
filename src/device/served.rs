//! A device served on a task of its own until stopped (a UDP or WebSocket replay): where
//! it listens, and how to stop it. Dropping it stops it too.

use std::future::Future;
use std::net::SocketAddr;

use tokio::sync::oneshot;

pub struct Served {
    /// Where it listens.
    pub local: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Served {
    /// Runs `serve` on its own task; it returns when the receiver it is given fires.
    pub fn spawn<F>(local: SocketAddr, serve: impl FnOnce(oneshot::Receiver<()>) -> F) -> Served
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        Served { local, stop: Some(stop), task: Some(tokio::spawn(serve(stopped))) }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}
