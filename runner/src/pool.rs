//! Threads for supervised processes, reused: an invoke's pump thread goes back to the pool when
//! its process is done and waits a minute for the next one. Creating and tearing down a thread
//! per invoke costs more than the rest of an invoke's bookkeeping.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// How long an idle thread waits for work before it exits.
const IDLE: Duration = Duration::from_secs(60);

struct Idle {
    next_id: u64,
    workers: Vec<(u64, Sender<Job>)>,
}

fn idle() -> &'static Mutex<Idle> {
    static IDLE_WORKERS: OnceLock<Mutex<Idle>> = OnceLock::new();
    IDLE_WORKERS.get_or_init(|| {
        Mutex::new(Idle {
            next_id: 0,
            workers: Vec::new(),
        })
    })
}

/// Runs `job` on an idle pool thread, or on a new one.
pub fn run(job: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    let mut job: Job = Box::new(job);
    loop {
        let worker = idle()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .workers
            .pop();
        match worker {
            Some((_, tx)) => match tx.send(job) {
                Ok(()) => return Ok(()),
                // That thread is gone; try the next one.
                Err(mpsc::SendError(returned)) => job = returned,
            },
            None => break,
        }
    }
    std::thread::Builder::new()
        .name("agentbox-pump".into())
        .spawn(move || worker(job))
        .map(|_| ())
}

/// Like [`run`], but when no thread can be created the job goes to Tokio's blocking pool
/// (where it waits for a thread) instead of being lost. Must be called inside the runtime.
pub fn run_or_queue(job: impl FnOnce() + Send + 'static) {
    let slot: Arc<Mutex<Option<Job>>> = Arc::new(Mutex::new(Some(Box::new(job))));
    let take = |slot: &Mutex<Option<Job>>| slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    let theirs = Arc::clone(&slot);
    if let Err(e) = run(move || {
        if let Some(job) = take(&theirs) {
            job();
        }
    }) {
        tracing::warn!(error = %e, "cannot start a pump thread; queueing on the blocking pool");
        if let Some(job) = take(&slot) {
            tokio::task::spawn_blocking(job);
        }
    }
}

fn worker(first: Job) {
    let (tx, rx) = mpsc::channel::<Job>();
    let mut job = first;
    loop {
        job();
        let id = {
            let mut idle = idle().lock().unwrap_or_else(|p| p.into_inner());
            idle.next_id += 1;
            let id = idle.next_id;
            idle.workers.push((id, tx.clone()));
            id
        };
        job = match rx.recv_timeout(IDLE) {
            Ok(next) => next,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                let mut idle = idle().lock().unwrap_or_else(|p| p.into_inner());
                let before = idle.workers.len();
                idle.workers.retain(|(w, _)| *w != id);
                if idle.workers.len() < before {
                    return;
                }
                drop(idle);
                // Someone took this thread just as it timed out: its job is on the way.
                match rx.recv() {
                    Ok(next) => next,
                    Err(_) => return,
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_reused() {
        let (tx, rx) = mpsc::channel();
        for _ in 0..5 {
            let tx = tx.clone();
            run(move || {
                let _ = tx.send(std::thread::current().id());
            })
            .expect("run");
            // Sequential jobs: each finds the previous one's thread idle (or about to be).
            let _ = rx.recv_timeout(Duration::from_secs(5)).expect("job ran");
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let tx = tx.clone();
            run(move || {
                std::thread::sleep(Duration::from_millis(5));
                let _ = tx.send(std::thread::current().id());
            })
            .expect("run");
            seen.insert(rx.recv_timeout(Duration::from_secs(5)).expect("job ran"));
        }
        assert!(seen.len() < 20, "every job got a new thread");
    }
}
