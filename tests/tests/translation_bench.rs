//! `vmm bench translation --quick` end to end: it runs the whole quick
//! matrix against real KVM and writes every output file, each file parses
//! as what it claims to be, and `--replot` redraws the plots from the CSV.

use std::time::{Duration, Instant};

use memvisor_tests::Vmm;
use memvisor_tests::vmm::TempDir;
use serde_json::Value;

/// The quick matrix: 4 workloads × 2 working sets × (native, 4k, 2m) × (anon, thp).
const QUICK_CELLS: usize = 4 * 2 * 3 * 2;
const WORKLOADS: [&str; 4] = ["chase-page", "chase-line", "gups", "seq-read"];
const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

#[test]
fn quick_bench_writes_json_csv_markdown_and_plots_that_parse() {
    let dir = TempDir::new("bench-translation");
    let out = dir.path().join("out");
    let started = Instant::now();
    let r = Vmm::new(["bench".as_ref(), "translation".as_ref(), "--quick".as_ref(), "--out".as_ref(), out.as_os_str()]).output();
    r.assert_success();
    assert!(started.elapsed() < Duration::from_secs(60), "--quick must run in under a minute, took {:?}", started.elapsed());
    let read = |name: &str| std::fs::read(out.join(name)).unwrap_or_else(|e| panic!("{name} was not written: {e}"));

    let json: Value = serde_json::from_slice(&read("results.json")).expect("results.json is JSON");
    let cells = json["cells"].as_array().expect("cells");
    assert_eq!(cells.len(), QUICK_CELLS, "{json}");
    for c in cells {
        assert_eq!(c["status"], "ok", "every quick cell runs on this host: {c}");
        let median = c["ns"]["median"].as_f64().unwrap_or_else(|| panic!("a measured cell has a median: {c}"));
        assert!(median > 0.0 && c["ns"]["n"].as_u64() >= Some(5), "{c}");
        assert!(c["leaf"] == "native" || c["ratio"].as_f64().is_some_and(|r| r > 0.0), "guest cells have a ratio: {c}");
    }
    assert!(json["mode"].is_string() && json["tsc_khz"].as_u64().is_some_and(|k| k > 0), "{}", json["mode"]);

    let csv = String::from_utf8(read("results.csv")).expect("results.csv is text");
    let mut lines = csv.lines();
    let header = lines.next().unwrap_or_default();
    assert!(header.starts_with("workload,ws_bytes,leaf,backing,status,median_ns,min_ns,max_ns,reps,ratio_to_native"), "{header}");
    assert!(header.contains("timed_pages_1g") && header.ends_with(",reason"), "{header}");
    let columns = header.split(',').count();
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), QUICK_CELLS);
    assert!(rows.iter().all(|l| l.split(',').count() == columns), "every row has the header's columns:\n{csv}");

    let md = String::from_utf8(read("results.md")).expect("results.md is text");
    for w in WORKLOADS {
        assert!(md.contains(&format!("**{w}**")), "a table for {w}:\n{md}");
    }
    assert!(md.contains("| Δ4k | Δ2m | Δ1g |") && md.contains("| anon | native |"), "{md}");

    for w in WORKLOADS {
        let svg = String::from_utf8(read(&format!("{w}.svg"))).expect("SVG is text");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>") && svg.contains("guest 2m"), "{w}.svg");
        let png = read(&format!("{w}.png"));
        assert!(png.starts_with(PNG_MAGIC) && png.len() > 1000, "{w}.png is a PNG");
    }

    // --replot redraws the same plots from the CSV alone.
    for w in WORKLOADS {
        for ext in ["svg", "png"] {
            std::fs::remove_file(out.join(format!("{w}.{ext}"))).expect("remove a plot");
        }
    }
    Vmm::new(["bench".as_ref(), "translation".as_ref(), "--replot".as_ref(), out.as_os_str()]).output().assert_success();
    for w in WORKLOADS {
        let svg = String::from_utf8(read(&format!("{w}.svg"))).expect("SVG is text");
        assert!(svg.starts_with("<svg") && svg.contains("anon guest 4k"), "{w}.svg redrawn");
        let png = read(&format!("{w}.png"));
        assert!(png.starts_with(PNG_MAGIC) && png.len() > 1000, "{w}.png redrawn");
    }
}
