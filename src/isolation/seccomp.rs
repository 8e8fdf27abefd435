//! A seccomp filter on every command: the kernel keyring calls (`add_key`, `request_key`,
//! `keyctl`) fail with ENOSYS, as on a kernel built without keyrings; every other call is
//! allowed.
//!
//! Why: every isolated sandbox runs as the same user (`[sandbox] run_as`), and the kernel keeps
//! one user keyring per user, outside every namespace and cgroup. Found from outside: sandbox A
//! stored a value in it, was deleted, and sandbox B — created later — read it; and A filled the
//! user's key quota so B's `add_key` failed. Docker's default profile refuses the same calls.
//!
//! The filter is installed in the command's child between `fork` and `exec`
//! ([`install_in_child`]) and inherited by everything it starts (a filter cannot be removed).
//! It checks the architecture first: on x86_64 the x32 variants (syscall bit 30) and the i386
//! compat numbers are refused too, on aarch64 the AArch32 ones. No other architecture can
//! reach the kernel from a process of this build; one would pass unfiltered.

use std::io;

/// `struct seccomp_data` offsets: the syscall number, then the audit architecture.
const NR: u32 = 0;
const ARCH: u32 = 4;

#[cfg(target_arch = "x86_64")]
mod table {
    /// `AUDIT_ARCH_X86_64`.
    pub const NATIVE: u32 = 0xC000_003E;
    /// `AUDIT_ARCH_I386` (int 0x80 from a 64-bit process).
    pub const COMPAT: u32 = 0x4000_0003;
    /// add_key, request_key, keyctl.
    pub const NATIVE_NRS: [u32; 3] = [248, 249, 250];
    pub const COMPAT_NRS: [u32; 3] = [286, 287, 288];
    /// x32 calls are the native numbers with this bit set.
    pub const NATIVE_MASK: u32 = !0x4000_0000;
}

#[cfg(target_arch = "aarch64")]
mod table {
    /// `AUDIT_ARCH_AARCH64`.
    pub const NATIVE: u32 = 0xC000_00B7;
    /// `AUDIT_ARCH_ARM` (AArch32 compat).
    pub const COMPAT: u32 = 0x4000_0028;
    pub const NATIVE_NRS: [u32; 3] = [217, 218, 219];
    pub const COMPAT_NRS: [u32; 3] = [309, 310, 311];
    pub const NATIVE_MASK: u32 = !0;
}

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

/// The program (classic BPF over `struct seccomp_data`).
pub fn program() -> Vec<libc::sock_filter> {
    use table::{COMPAT, COMPAT_NRS, NATIVE, NATIVE_MASK, NATIVE_NRS};
    let load = |off| stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, off);
    let allow = stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW);
    let deny = stmt(
        libc::BPF_RET | libc::BPF_K,
        libc::SECCOMP_RET_ERRNO | (libc::ENOSYS as u32 & libc::SECCOMP_RET_DATA),
    );
    // Three compares, each jumping to `deny` (the last instruction) on a match.
    let block = |nrs: [u32; 3], to_deny: u8| {
        [
            jeq(nrs[0], to_deny, 0),
            jeq(nrs[1], to_deny - 1, 0),
            jeq(nrs[2], to_deny - 2, 0),
        ]
    };
    let mut p = vec![
        load(ARCH),
        jeq(NATIVE, 1, 0), // → native
        jeq(COMPAT, 6, 5), // → compat, else allow
        load(NR),          // native:
        stmt(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, NATIVE_MASK),
    ];
    p.extend(block(NATIVE_NRS, 8)); // deny is the last of the 15
    p.push(allow);
    p.push(load(NR)); // compat:
    p.extend(block(COMPAT_NRS, 3));
    p.push(allow);
    p.push(deny);
    p
}

/// In a command's child between `fork` and `exec`: installs `prog` ([`program`], built before
/// the fork). The daemon is root (`CAP_SYS_ADMIN`), so no `no_new_privs` is needed for it.
/// Async-signal-safe: one `prctl(2)` on memory built before the fork.
///
/// # Errors
/// The kernel refused the filter (the spawn then fails: no command runs without it).
pub fn install_in_child(prog: &[libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: PR_SET_SECCOMP reads `fprog` and the program it points to, both alive for the
    // call; the kernel copies the program.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program on (arch, nr) as the kernel would (the subset of cBPF it uses).
    fn run(p: &[libc::sock_filter], arch: u32, nr: u32) -> u32 {
        let (mut pc, mut a) = (0usize, 0u32);
        loop {
            let i = p[pc];
            let code = u32::from(i.code);
            match code {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    a = if i.k == ARCH { arch } else { nr };
                }
                c if c == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K => a &= i.k,
                c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => {
                    pc += usize::from(if a == i.k { i.jt } else { i.jf });
                }
                c if c == libc::BPF_RET | libc::BPF_K => return i.k,
                other => panic!("unexpected instruction {other:#x}"),
            }
            pc += 1;
        }
    }

    #[test]
    fn keyring_calls_are_refused_on_every_abi_and_nothing_else() {
        use table::*;
        let p = program();
        let denied = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
        for nr in NATIVE_NRS {
            assert_eq!(run(&p, NATIVE, nr), denied, "native {nr}");
            assert_eq!(run(&p, NATIVE, nr | !NATIVE_MASK), denied, "x32 {nr}");
        }
        for nr in COMPAT_NRS {
            assert_eq!(run(&p, COMPAT, nr), denied, "compat {nr}");
        }
        for nr in (0..1000).filter(|n| !NATIVE_NRS.contains(n)) {
            assert_eq!(run(&p, NATIVE, nr), libc::SECCOMP_RET_ALLOW, "native {nr}");
        }
        for nr in (0..1000).filter(|n| !COMPAT_NRS.contains(n)) {
            assert_eq!(run(&p, COMPAT, nr), libc::SECCOMP_RET_ALLOW, "compat {nr}");
        }
        assert_eq!(run(&p, 0x1234, NATIVE_NRS[2]), libc::SECCOMP_RET_ALLOW);
    }
}
