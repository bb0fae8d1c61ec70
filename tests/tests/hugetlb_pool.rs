//! The test support's hugetlb reservations give back exactly what they
//! took (issue 2, item 8: "hugetlb tests reserve the pages they need and
//! give them back"), and a VM on reserved pages really uses them.

use memvisor_tests::Vmm;
use memvisor_tests::hugetlb::{PageSize, PoolLock, Reservation};

#[test]
fn reservations_are_given_back_on_drop() {
    for (size, pages) in [(PageSize::M2, 8), (PageSize::G1, 1)] {
        let before = {
            let _lock = PoolLock::acquire();
            size.pool().unwrap_or_else(|e| panic!("{e}"))
        };
        {
            let r = Reservation::reserve(size, pages).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.size(), size);
            assert!(size.available().unwrap_or_else(|e| panic!("{e}")) >= pages, "{size:?}: {pages} pages should be free");
        }
        {
            let _lock = PoolLock::acquire();
            assert_eq!(size.pool().unwrap_or_else(|e| panic!("{e}")), before, "{size:?}: the pool is back to its size");
        }
    }
}

#[test]
fn a_hugetlb_vm_takes_its_pages_from_the_pool_and_returns_them() {
    let size = PageSize::M2;
    let _r = Reservation::reserve(size, 64).unwrap_or_else(|e| panic!("{e}"));
    let free_before = size.available().unwrap_or_else(|e| panic!("{e}"));
    let r = Vmm::run_json(["--mem", "128M", "--backing", "hugetlb-2m", "--prefault"]).output();
    r.assert_success();
    let report = r.json();
    let hugetlb: u64 = report["memory"].as_array().map(|m| m.iter().filter_map(|x| x["hugetlb_bytes"].as_u64()).sum()).unwrap_or(0);
    assert_eq!(hugetlb, 128 << 20, "a prefaulted hugetlb VM holds all its RAM in hugetlb pages");
    // The VM has exited: its pages are free again.
    assert_eq!(size.available().unwrap_or_else(|e| panic!("{e}")), free_before);
}
