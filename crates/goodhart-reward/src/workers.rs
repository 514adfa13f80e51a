//! Independent jobs on a bounded number of threads (the unit-test sandbox's programs, an
//! LLM judge's requests).

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Mutex,
};

/// `f(0), ..., f(n - 1)` computed on at most `workers` threads (at least one), each
/// taking the next index when it finishes one; the results in index order.
pub(crate) fn map<T: Send>(workers: usize, n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<T>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, n.max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let r = f(i);
                results.lock().expect("a job panicked")[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .expect("a job panicked")
        .into_iter()
        .map(|r| r.expect("every index ran"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_job_runs_once_in_order_within_the_bound() {
        let running = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let out = map(3, 40, |i| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(2));
            running.fetch_sub(1, Ordering::SeqCst);
            i * i
        });
        assert_eq!(out, (0..40).map(|i| i * i).collect::<Vec<_>>());
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert_eq!(map(4, 0, |i| i), Vec::<usize>::new());
        assert_eq!(map(0, 2, |i| i + 1), vec![1, 2], "0 workers runs on one");
    }
}
