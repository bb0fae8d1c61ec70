//! The translation benchmark's guest workload: one source
//! (`memvisor_user::translation`) run as a ring-3 task in the guest gives
//! the same results as the same code run natively here, reports every
//! phase, and builds buffers larger than one buddy block.

use memvisor_tests::Vmm;
use memvisor_user::translation::{self, Workload};
use serde_json::Value;

/// (event, a, b) of every translation event in a run report.
fn events(report: &Value) -> Vec<(String, u64, u64)> {
    report["workload_events"]
        .as_array()
        .expect("workload events")
        .iter()
        .filter(|e| e["event"].as_str().is_some_and(|n| n.starts_with("Translation")))
        .map(|e| (e["event"].as_str().unwrap_or_default().to_string(), e["a"].as_u64().unwrap_or(0), e["b"].as_u64().unwrap_or(0)))
        .collect()
}

/// The native result of `w` with the guest task's sequence: prepare, one
/// warm-up repetition, `reps` timed ones.
fn native_state(w: Workload, bytes: u64, reps: u64, steps: u64, seed: u64) -> u64 {
    let mut buf = vec![0u64; (bytes / 8) as usize];
    let base = buf.as_mut_ptr().cast::<u8>();
    // SAFETY: `buf` holds `bytes` bytes and outlives the calls; the
    // workloads only use offsets within it.
    unsafe {
        let mut s = translation::prepare(w, base, bytes, seed);
        for _ in 0..=reps {
            s = translation::run(w, base, bytes, steps, s);
        }
        s
    }
}

#[test]
fn guest_workloads_report_every_phase_and_match_the_native_run() {
    let (ws, reps, steps, seed) = (1u64 << 20, 5u64, 10_000u64, 9u64);
    let spec = format!("translation:ws={ws},reps={reps},steps={steps},seed={seed}");
    let r = Vmm::run_json(["--guest-page", "4k", "--skip-selftest", "--workload", &spec]).output();
    r.assert_success();
    let ev = events(&r.json());
    // Per workload: Begin, Timed, reps × Rep, End.
    assert_eq!(ev.len(), 4 * (3 + reps as usize), "{ev:#?}");
    for (i, w) in Workload::ALL.iter().enumerate() {
        let e = &ev[i * (3 + reps as usize)..(i + 1) * (3 + reps as usize)];
        assert_eq!((e[0].0.as_str(), e[0].1, e[0].2), ("TranslationBegin", *w as u64, w.units(ws)));
        assert_eq!((e[1].0.as_str(), e[1].1), ("TranslationTimed", *w as u64));
        for rep in &e[2..2 + reps as usize] {
            assert_eq!(rep.0, "TranslationRep");
            assert!(rep.1 > 0, "a repetition takes TSC ticks");
            assert_eq!(rep.2, translation::accesses(*w, ws, steps));
        }
        let end = &e[2 + reps as usize];
        assert_eq!((end.0.as_str(), end.1), ("TranslationEnd", *w as u64));
        // GUPS' random state and the sequential sum do not depend on where
        // the buffer is: the guest's copy of the code computed what ours does.
        if matches!(w, Workload::Gups | Workload::SeqRead) {
            assert_eq!(end.2, native_state(*w, ws, reps, steps, seed), "{} in the guest and natively", w.name());
        }
    }
}

#[test]
fn a_buffer_larger_than_one_buddy_block_is_built_from_several() {
    // 2 GiB: two 1 GiB buddy blocks (the allocator's largest), mapped one
    // after the other with 2 MiB leaves; the page chase visits every page.
    let ws = 2u64 << 30;
    let pages = ws / 4096;
    let spec = format!("translation:ws={ws},workloads=1,reps=5,steps={pages}");
    let r = Vmm::run_json(["--mem", "2560M", "--guest-page", "2m", "--skip-selftest", "--workload", &spec]).output();
    r.assert_success();
    let report = r.json();
    let ev = events(&report);
    assert_eq!(ev.first().map(|e| (e.0.as_str(), e.2)), Some(("TranslationBegin", pages)), "{ev:?}");
    let end = ev.last().expect("events");
    assert_eq!(end.0, "TranslationEnd");
    // A whole number of cycles through all pages ends where it started: the
    // first node, in page 0 of the buffer at USER_HEAP_BASE.
    let heap = memvisor_abi::layout::USER_HEAP_BASE;
    assert_eq!(end.2, heap + translation::line_of(0) * 64, "a full cycle over {pages} pages");
}

#[test]
fn a_working_set_larger_than_free_ram_fails_cleanly() {
    // 256 MiB of guest RAM cannot hold a 256 MiB buffer beside the kernel:
    // the guest says so and exits nonzero instead of looping or faulting.
    let r = Vmm::new(["run", "--mem", "256M", "--skip-selftest", "--workload", "translation:ws=256M,reps=1,steps=10"]).timeout(std::time::Duration::from_secs(60)).output();
    assert_ne!(r.code(), 0, "{}", r.describe());
    assert!(r.stdout.contains("cannot build a 268435456 byte translation buffer"), "{}", r.describe());
}

#[test]
fn bad_translation_workloads_are_refused() {
    let r = Vmm::new(["run", "--workload", "translation:ws=3M"]).output();
    r.assert_error(&["power of two"]);
}
