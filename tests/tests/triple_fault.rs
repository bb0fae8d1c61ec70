//! A guest that triple-faults (`--cmdline memvisor.test=triple-fault`, the
//! guest's deliberate fault) ends the run with one error line that carries
//! its registers, and a nonzero exit (issue 2, item 7).

use memvisor_tests::Vmm;

#[test]
fn a_triple_faulting_guest_reports_its_registers_and_fails() {
    let r = Vmm::new(["run", "--cmdline", "memvisor.test=triple-fault"]).output();
    let line = r.error_line();
    assert!(line.contains("triple-fault"), "{line}\n{}", r.describe());
    for reg in ["rip=", "rsp=", "cr0=", "cr3=", "efer="] {
        assert!(line.contains(reg), "register dump should show {reg}: {line}");
    }
}
