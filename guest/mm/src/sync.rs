//! Synchronisation for a kernel with several CPUs: a spinlock and a set of
//! CPUs as one atomic word.
//!
//! Both are plain `core::sync::atomic` code, so the unit tests run them on
//! the host with real threads. In the guest they compile to the few locked
//! instructions an emulated ring 0 must execute one by one (~1 µs each on
//! this project's reference host): an uncontended [`SpinLock::lock`] is one
//! `xchg`, its release one store.
//!
//! What they do not do: disable interrupts. The guest kernel runs with
//! IF = 0 at ring 0 (interrupt gates clear it; only the idle loop and the
//! balloon's wait set it, around `hlt`), so a lock holder is never
//! interrupted on its own CPU; ring 3, which runs with IF = 1, holds no
//! kernel locks.

use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A test-and-test-and-set spinlock around a `T`.
#[derive(Debug, Default)]
pub struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the lock hands out at most one `&mut T` at a time (the guard), so
// sharing the lock between threads is sharing `T` by moving it: `T: Send`.
unsafe impl<T: Send> Sync for SpinLock<T> {}
// SAFETY: owning the lock is owning the `T`.
unsafe impl<T: Send> Send for SpinLock<T> {}

impl<T> SpinLock<T> {
    /// A free lock around `value`.
    pub const fn new(value: T) -> Self {
        SpinLock { locked: AtomicBool::new(false), value: UnsafeCell::new(value) }
    }

    /// Takes the lock, spinning until it is free.
    pub fn lock(&self) -> SpinGuard<'_, T> {
        self.lock_with(|| {})
    }

    /// Takes the lock, calling `while_waiting` between attempts (the TLB
    /// shootdown's waiters answer requests addressed to them there, so that
    /// two CPUs never wait for each other).
    pub fn lock_with(&self, mut while_waiting: impl FnMut()) -> SpinGuard<'_, T> {
        loop {
            if let Some(g) = self.try_lock() {
                return g;
            }
            // Test before test-and-set: spinning on a plain load keeps the
            // line shared instead of bouncing it with every attempt.
            while self.locked.load(Ordering::Relaxed) {
                while_waiting();
                core::hint::spin_loop();
            }
        }
    }

    /// Takes the lock if it is free.
    pub fn try_lock(&self) -> Option<SpinGuard<'_, T>> {
        if self.locked.swap(true, Ordering::Acquire) {
            None
        } else {
            Some(SpinGuard { lock: self })
        }
    }

    /// Whether someone holds the lock now (a hint: it may change at once).
    pub fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Relaxed)
    }
}

/// Holds a [`SpinLock`]; releases it when dropped.
#[derive(Debug)]
pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard exists only while the lock is held by it.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this the only access.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

/// Most CPUs a [`CpuSet`] holds: the bits of its word.
pub const CPU_SET_BITS: usize = 64;

/// A set of CPU indices below [`CPU_SET_BITS`] as one atomic word.
#[derive(Debug, Default)]
pub struct CpuSet(AtomicU64);

impl CpuSet {
    /// The empty set.
    pub const fn new() -> Self {
        CpuSet(AtomicU64::new(0))
    }

    /// Adds `cpu` (ignored when out of range).
    pub fn insert(&self, cpu: usize) {
        if cpu < CPU_SET_BITS {
            self.0.fetch_or(1 << cpu, Ordering::AcqRel);
        }
    }

    /// Removes `cpu`.
    pub fn remove(&self, cpu: usize) {
        if cpu < CPU_SET_BITS {
            self.0.fetch_and(!(1 << cpu), Ordering::AcqRel);
        }
    }

    /// Whether `cpu` is in the set.
    pub fn contains(&self, cpu: usize) -> bool {
        cpu < CPU_SET_BITS && self.0.load(Ordering::Acquire) & (1 << cpu) != 0
    }

    /// The set as a bit mask (bit `i`: CPU `i`).
    pub fn bits(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Replaces the whole set.
    pub fn set_bits(&self, bits: u64) {
        self.0.store(bits, Ordering::Release);
    }

    /// How many CPUs are in the set.
    pub fn len(&self) -> usize {
        self.bits().count_ones() as usize
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.bits() == 0
    }
}

/// The CPUs of a mask, lowest first.
pub fn cpus_of(mut bits: u64) -> impl Iterator<Item = usize> {
    core::iter::from_fn(move || {
        if bits == 0 {
            return None;
        }
        let cpu = bits.trailing_zeros() as usize;
        bits &= bits - 1;
        Some(cpu)
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::sync::Arc;
    use std::vec::Vec;

    use super::*;

    #[test]
    fn a_spinlock_lets_one_holder_in_at_a_time() {
        let lock = Arc::new(SpinLock::new(0u64));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let lock = Arc::clone(&lock);
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        // A read-modify-write that loses updates unless the
                        // lock excludes the other threads.
                        let mut g = lock.lock();
                        let v = *g;
                        *g = v + 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*lock.lock(), 80_000);
    }

    #[test]
    fn try_lock_fails_while_held_and_the_waiter_runs_its_hook() {
        let lock = SpinLock::new(());
        let g = lock.lock();
        assert!(lock.try_lock().is_none());
        assert!(lock.is_locked());
        drop(g);
        assert!(lock.try_lock().is_some());

        let lock = Arc::new(SpinLock::new(()));
        let held = lock.lock();
        let l2 = Arc::clone(&lock);
        let waited = Arc::new(AtomicU64::new(0));
        let w2 = Arc::clone(&waited);
        let t = std::thread::spawn(move || {
            let _g = l2.lock_with(|| {
                w2.fetch_add(1, Ordering::Relaxed);
            });
        });
        while waited.load(Ordering::Relaxed) == 0 {
            std::hint::spin_loop();
        }
        drop(held);
        t.join().unwrap();
    }

    #[test]
    fn cpu_sets_hold_the_cpus_put_in() {
        let s = CpuSet::new();
        assert!(s.is_empty());
        s.insert(0);
        s.insert(5);
        s.insert(63);
        s.insert(64); // out of range: ignored
        assert_eq!(s.len(), 3);
        assert!(s.contains(5) && !s.contains(4) && !s.contains(64));
        s.remove(5);
        assert_eq!(cpus_of(s.bits()).collect::<Vec<_>>(), [0, 63]);
        s.set_bits(0b1010);
        assert_eq!(cpus_of(s.bits()).collect::<Vec<_>>(), [1, 3]);
    }
}
