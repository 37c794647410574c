//! Spawning our background tasks through one future type.
//!
//! tokio builds its task machinery (poll, completion, cancellation, drop: ~1 KB of code) once
//! per spawned future type. Our tasks that return nothing are boxed into a single
//! `dyn Future` type first, so that machinery exists once for all of them instead of once per
//! `async` block (README "Size"). The box is one small allocation per task, next to the task
//! cell tokio allocates anyway.

use std::future::Future;
use std::pin::Pin;

use tokio::task::JoinHandle;

/// A task's future once boxed: the single type tokio instantiates its machinery for.
type BoxedTask = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// `tokio::spawn` for a task that returns nothing.
pub fn spawn<F>(task: F) -> JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    spawn_boxed(Box::pin(task))
}

/// Not generic, so there is one copy of the spawn path too.
fn spawn_boxed(task: BoxedTask) -> JoinHandle<()> {
    tokio::spawn(task)
}

/// `std::thread::Builder::spawn` for a thread that returns nothing, through one boxed closure
/// type for the same reason: std's thread start-up code exists once, not once per closure.
pub fn thread<F>(builder: std::thread::Builder, body: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    thread_boxed(builder, Box::new(body))
}

fn thread_boxed(
    builder: std::thread::Builder,
    body: Box<dyn FnOnce() + Send + 'static>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    builder.spawn(body)
}

/// `std::thread::spawn` (which panics when the OS refuses a thread) through [`thread`].
pub fn spawn_thread<F>(body: F) -> std::thread::JoinHandle<()>
where
    F: FnOnce() + Send + 'static,
{
    thread(std::thread::Builder::new(), body).expect("failed to spawn thread")
}
