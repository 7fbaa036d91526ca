//! A scoped-thread parallel map for CPU work on blocks (compression, decompression), used by
//! clients and workers outside the async runtime.

/// `f` of every item, in order, computed on up to `threads` scoped threads (contiguous
/// shares). The items of a thread that panicked are replaced by one `on_panic()`.
pub fn par_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(usize, &T) -> R + Sync,
    on_panic: impl Fn() -> R,
) -> Vec<R> {
    let per = items.len().div_ceil(threads.max(1)).max(1);
    if per >= items.len() {
        return items.iter().enumerate().map(|(i, t)| f(i, t)).collect();
    }
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(per)
            .enumerate()
            .map(|(c, part)| {
                s.spawn(move || {
                    let first = c * per;
                    part.iter()
                        .enumerate()
                        .map(|(j, t)| f(first + j, t))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|_| vec![on_panic()]))
            .collect()
    })
}

/// Threads worth using for block CPU work here: the available parallelism, at most `cap`.
pub fn block_threads(cap: usize) -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, cap.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_in_order_with_indices() {
        let items: Vec<u32> = (0..103).collect();
        for threads in [1, 2, 4, 200] {
            let out = par_map(&items, threads, |i, x| (i as u32) * 1000 + x, || 0);
            let want: Vec<u32> = (0..103).map(|i| i * 1000 + i).collect();
            assert_eq!(out, want, "{threads} threads");
        }
        assert!(par_map(&[] as &[u8], 4, |_, x| *x, || 0).is_empty());
    }
}
