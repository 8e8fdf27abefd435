//! A seccomp filter on every command, refusing what Docker's default profile refuses for the
//! same reasons; every other call is allowed:
//! - the kernel keyring (`add_key`, `request_key`, `keyctl`: ENOSYS, as on a kernel without
//!   keyrings). The kernel keeps one keyring per user, outside every namespace and cgroup.
//!   Found from outside: sandbox A stored a value in it, was deleted, and sandbox B — created
//!   later, same user — read it; A also filled the user's key quota so B's `add_key` failed.
//!   With a user per sandbox, a later sandbox of the same slot would still inherit it.
//! - new user namespaces (`clone`/`unshare` with `CLONE_NEWUSER`: EPERM; `clone3`, whose flags
//!   a filter cannot read: ENOSYS, after which glibc falls back to `clone`). Found from
//!   outside: `unshare -Urn` gave a command root with `CAP_NET_ADMIN` in a namespace of its
//!   own, where nftables turned on connection tracking that neither the sandbox's flow bounds
//!   nor its memory cgroup saw — and unprivileged nf_tables is a known road to kernel
//!   exploits. Without a user namespace, no other namespace can be made (no capability).
//! - Linux AIO contexts (`io_setup`: ENOSYS). Their events count against one host-wide
//!   budget (`fs.aio-max-nr`, 65,536), outside every namespace and cgroup: found from
//!   outside, one sandbox reserved all of it, and root on the host and the other sandboxes got
//!   EAGAIN (MySQL, QEMU `aio=native`). Programs fall back to threads on ENOSYS.
//! - io_uring (`io_uring_setup`: ENOSYS, as Docker's default profile since 2023): a large,
//!   young kernel surface with a history of privilege escalations; its users fall back too.
//! - sockets of any family but `AF_UNIX`, `AF_INET`, `AF_INET6` and `AF_NETLINK` (`socket`,
//!   `socketpair`: EAFNOSUPPORT, as for a family the kernel lacks). Found from outside:
//!   `AF_VSOCK` is not a network-namespace citizen, so on a VM host a command reached the
//!   hypervisor side of the virtio vsock transport past the namespace, its rules and sealgate
//!   (Docker and containerd refuse it since 2022); `AF_ALG`, `AF_TIPC`, `AF_RDS`, `AF_KCM`,
//!   `AF_XDP` and the rest are kernel surface no sandbox needs. `AF_NETLINK` is refused too
//!   unless `[sandbox] netlink = true`: the replies a netlink socket queues are kernel memory
//!   that no cgroup charges, so a command that asked for dumps and never read them held 1 GiB
//!   of the host's memory from 125 sockets under a 256 MiB limit (outside review; glibc's
//!   `getaddrinfo` works without it, `getifaddrs` fails). When allowed it opens only as
//!   `NETLINK_ROUTE`, `NETLINK_SOCK_DIAG` and `NETLINK_GENERIC` (else EPROTONOSUPPORT): with
//!   `NETLINK_KOBJECT_UEVENT` a command read the host's device events (review). On the i386
//!   ABI the family of `socketcall(SYS_SOCKET | SYS_SOCKETPAIR, …)` is behind a pointer a
//!   filter cannot read, so those two subcalls are ENOSYS: a 32-bit program opens sockets
//!   with the `socket` syscall (kernel ≥ 4.3) or not at all.
//! - `perf_event_open` and `userfaultfd` (ENOSYS, as Docker's default profile refuses them):
//!   an outside review opened both from a command (user-space only under this host's
//!   `perf_event_paranoid` and `unprivileged_userfaultfd`); both are exploit-rich surfaces
//!   no sandbox needs (no profiling inside, no userfaultfd-based GC).
//! - `fanotify_init` (ENOSYS; Docker's default profile allows it only with `CAP_SYS_ADMIN`):
//!   an outside pass opened an unprivileged fanotify group and watched files every sandbox
//!   shares read-only with the host. (inotify stays: file watchers need it. What it shows of
//!   shared files, opens and reads by other sandboxes and the host, is an accepted risk:
//!   ARCHITECTURE "Accepted risks".)
//! - `bpf` (ENOSYS; Docker's default profile allows it only with `CAP_SYS_ADMIN`/`CAP_BPF`):
//!   unprivileged eBPF (socket filters through the verifier) has been a road to kernel
//!   exploits (CVE-2021-3490, CVE-2022-23222); only `kernel.unprivileged_bpf_disabled` kept an
//!   outside review's call from the kernel. `syslog` (EPERM, as with `dmesg_restrict`; Docker
//!   allows it only with `CAP_SYSLOG`): where the host leaves `dmesg_restrict` off, the
//!   kernel log shows other sandboxes' OOM kills and veth events.
//!
//! The filter is installed in the command's child between `fork` and `exec`
//! ([`install_in_child`]) and inherited by everything it starts (a filter cannot be removed).
//! That one lets netlink through, since the launcher needs it (`ip netns exec` opens a
//! `NETLINK_ROUTE` socket before it does anything); unless `[sandbox] netlink = true`, bwrap
//! stacks a second one that refuses it (`--seccomp FD`, read from a pipe the daemon filled),
//! installed as its last step before it executes the command: filters stack, and the
//! strictest answer wins.
//! It checks the architecture first: on x86_64 the i386 compat numbers are refused too, and
//! the x32 ABI (syscall bit 30) whole (ENOSYS): no x32 program runs in a sandbox, and x32 has
//! numbers of its own (`io_setup` is 543 there) that a list of native numbers would miss; on
//! aarch64 the AArch32 numbers are refused too. No other architecture can
//! reach the kernel from a process of this build; one would pass unfiltered. The launcher
//! (`ip netns exec`, bwrap as root) makes its namespaces without `CLONE_NEWUSER`, so the
//! filter is installed before it runs.

use std::io;

/// `struct seccomp_data` offsets: the syscall number, the audit architecture, and the low
/// 32 bits of the first argument (little-endian).
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG0_LOW: u32 = 16;
/// The low 32 bits of the third argument (`socket`'s protocol).
const ARG2_LOW: u32 = 32;

// The offsets above read the low half of each 64-bit argument where a little-endian machine
// keeps it.
#[cfg(target_endian = "big")]
compile_error!("isolation::seccomp reads arguments as a little-endian machine lays them out");

/// The socket families a command may open: `AF_UNIX`, `AF_INET`, `AF_INET6`, and, with
/// `[sandbox] netlink = true`, `AF_NETLINK` ([`NETLINK`]).
const FAMILIES: &[u32] = &[1, 2, 10];

/// `AF_NETLINK`, open only in the protocols of [`NETLINK_PROTOCOLS`].
const NETLINK: u32 = 16;

/// `NETLINK_ROUTE` (ip, getaddrinfo), `NETLINK_SOCK_DIAG` (ss), `NETLINK_GENERIC`: the rest is
/// kernel surface a sandbox has no use for, and `NETLINK_KOBJECT_UEVENT` let a command read
/// the host's device events (the namespace is made by root, so it gets them; review).
const NETLINK_PROTOCOLS: &[u32] = &[0, 4, 16];

/// In an ABI's table: no such call (no syscall has this number; skipped by [`program`]).
const NONE: u32 = u32::MAX;

/// `socketcall`'s subcalls that create sockets (`SYS_SOCKET`, `SYS_SOCKETPAIR`).
const SOCKETCALL_CREATES: &[u32] = &[1, 8];

/// Set on the syscall numbers of the x32 ABI, which shares x86_64's audit architecture.
const X32_BIT: u32 = 0x4000_0000;

/// `CLONE_NEWUSER`: a new user namespace.
const CLONE_NEWUSER: u32 = 0x1000_0000;

/// What the filter does with a syscall of an ABI's table.
#[derive(Clone, Copy, Debug)]
enum Verdict {
    /// Always fails with this errno.
    Fail(i32),
    /// Fails with this errno when the first argument has any of these bits.
    FailIfArg0(u32, i32),
    /// `socket`/`socketpair`: EAFNOSUPPORT unless the family is in [`FAMILIES`] or, where
    /// netlink is allowed, is [`NETLINK`] with a protocol of [`NETLINK_PROTOCOLS`] (else
    /// EPROTONOSUPPORT).
    Socket,
    /// Fails with this errno when the first argument is one of these.
    FailIfArg0In(&'static [u32], i32),
}

/// One syscall ABI of the machine: its audit architecture, a bit that marks a whole foreign
/// ABI sharing it (x32 sets bit 30; 0: none), and what is refused.
struct Abi {
    arch: u32,
    foreign: u32,
    refused: [(u32, Verdict); 16],
}

/// The numbers of an ABI that [`refused`] filters.
struct Nrs {
    /// add_key, request_key, keyctl.
    keys: [u32; 3],
    clone: u32,
    unshare: u32,
    io_setup: u32,
    /// socket, socketpair.
    socket: [u32; 2],
    /// socketcall, or [`NONE`] where the ABI has none.
    socketcall: u32,
    /// perf_event_open, userfaultfd.
    perf_uffd: [u32; 2],
    fanotify_init: u32,
    bpf: u32,
    syslog: u32,
}

/// add_key, request_key, keyctl: ENOSYS; clone and unshare with `CLONE_NEWUSER`: EPERM; clone3
/// (its flags are behind a pointer a filter cannot read): ENOSYS, after which glibc uses clone;
/// io_setup and io_uring_setup (425 on every ABI): ENOSYS; socket and socketpair of a family
/// not in [`FAMILIES`]: EAFNOSUPPORT; socketcall creating a socket: ENOSYS; perf_event_open,
/// userfaultfd, fanotify_init and bpf: ENOSYS; syslog: EPERM.
const fn refused(n: Nrs) -> [(u32, Verdict); 16] {
    let family = Verdict::Socket;
    [
        (n.keys[0], Verdict::Fail(libc::ENOSYS)),
        (n.keys[1], Verdict::Fail(libc::ENOSYS)),
        (n.keys[2], Verdict::Fail(libc::ENOSYS)),
        (n.clone, Verdict::FailIfArg0(CLONE_NEWUSER, libc::EPERM)),
        (n.unshare, Verdict::FailIfArg0(CLONE_NEWUSER, libc::EPERM)),
        (435, Verdict::Fail(libc::ENOSYS)),
        (n.io_setup, Verdict::Fail(libc::ENOSYS)),
        (425, Verdict::Fail(libc::ENOSYS)),
        (n.socket[0], family),
        (n.socket[1], family),
        (
            n.socketcall,
            Verdict::FailIfArg0In(SOCKETCALL_CREATES, libc::ENOSYS),
        ),
        (n.perf_uffd[0], Verdict::Fail(libc::ENOSYS)),
        (n.perf_uffd[1], Verdict::Fail(libc::ENOSYS)),
        (n.fanotify_init, Verdict::Fail(libc::ENOSYS)),
        (n.bpf, Verdict::Fail(libc::ENOSYS)),
        (n.syslog, Verdict::Fail(libc::EPERM)),
    ]
}

#[cfg(target_arch = "x86_64")]
const ABIS: [Abi; 2] = [
    Abi {
        arch: 0xC000_003E, // AUDIT_ARCH_X86_64 (and x32)
        foreign: X32_BIT,
        refused: refused(Nrs {
            keys: [248, 249, 250],
            clone: 56,
            unshare: 272,
            io_setup: 206,
            socket: [41, 53],
            socketcall: NONE,
            perf_uffd: [298, 323],
            fanotify_init: 300,
            bpf: 321,
            syslog: 103,
        }),
    },
    Abi {
        arch: 0x4000_0003, // AUDIT_ARCH_I386 (int 0x80 from a 64-bit process)
        foreign: 0,
        refused: refused(Nrs {
            keys: [286, 287, 288],
            clone: 120,
            unshare: 310,
            io_setup: 245,
            socket: [359, 360],
            socketcall: 102,
            perf_uffd: [336, 374],
            fanotify_init: 338,
            bpf: 357,
            syslog: 103,
        }),
    },
];

#[cfg(target_arch = "aarch64")]
const ABIS: [Abi; 2] = [
    Abi {
        arch: 0xC000_00B7, // AUDIT_ARCH_AARCH64
        foreign: 0,
        refused: refused(Nrs {
            keys: [217, 218, 219],
            clone: 220,
            unshare: 97,
            io_setup: 0,
            socket: [198, 199],
            socketcall: NONE,
            perf_uffd: [241, 282],
            fanotify_init: 262,
            bpf: 280,
            syslog: 116,
        }),
    },
    Abi {
        arch: 0x4000_0028, // AUDIT_ARCH_ARM (AArch32 compat)
        foreign: 0,
        refused: refused(Nrs {
            keys: [309, 310, 311],
            clone: 120,
            unshare: 337,
            io_setup: 243,
            socket: [281, 288],
            socketcall: NONE, // OABI only, which arm64 does not run
            perf_uffd: [364, 388],
            fanotify_init: 367,
            bpf: 386,
            syslog: 103,
        }),
    },
];

/// A tiny assembler for the filter: instructions with symbolic jump targets.
#[derive(Clone, Copy)]
enum Op {
    Ld(u32),
    /// Jump to `.1` if the accumulator equals `.0`, else to `.2` (None: the next one).
    Jeq(u32, usize, Option<usize>),
    /// Jump to `.1` if the accumulator has any bit of `.0`, else fall through.
    Jset(u32, usize),
    Ret(u32),
    Label(usize),
}

fn ret_errno(errno: i32) -> u32 {
    libc::SECCOMP_RET_ERRNO | (errno as u32 & libc::SECCOMP_RET_DATA)
}

/// The program (classic BPF over `struct seccomp_data`): per ABI of the machine, the numbers
/// of [`ABIS`] are refused as their [`Verdict`] says; every other call, and every call of an
/// ABI the machine does not have, is allowed. `netlink`: whether [`NETLINK`] sockets of
/// [`NETLINK_PROTOCOLS`] may be opened (`[sandbox] netlink`).
pub fn program(netlink: bool) -> Vec<libc::sock_filter> {
    let mut ops = vec![Op::Ld(ARCH)];
    let mut next = 0usize;
    let mut label = || {
        next += 1;
        next
    };
    let allow = label();
    let abi_labels: Vec<usize> = ABIS.iter().map(|_| label()).collect();
    for (abi, l) in ABIS.iter().zip(&abi_labels) {
        ops.push(Op::Jeq(abi.arch, *l, None));
    }
    ops.push(Op::Ret(libc::SECCOMP_RET_ALLOW));
    let mut tails = Vec::new();
    for (abi, l) in ABIS.iter().zip(&abi_labels) {
        ops.extend([Op::Label(*l), Op::Ld(NR)]);
        if abi.foreign != 0 {
            let target = label();
            ops.push(Op::Jset(abi.foreign, target));
            tails.push((target, Verdict::Fail(libc::ENOSYS)));
        }
        for (nr, verdict) in abi.refused.into_iter().filter(|r| r.0 != NONE) {
            let target = label();
            ops.push(Op::Jeq(nr, target, None));
            tails.push((target, verdict));
        }
        ops.push(Op::Ret(libc::SECCOMP_RET_ALLOW));
    }
    for (target, verdict) in tails {
        ops.push(Op::Label(target));
        match verdict {
            Verdict::Fail(e) => ops.push(Op::Ret(ret_errno(e))),
            Verdict::FailIfArg0(bits, e) => {
                let fail = label();
                ops.extend([
                    Op::Ld(ARG0_LOW),
                    Op::Jset(bits, fail),
                    Op::Ret(libc::SECCOMP_RET_ALLOW),
                    Op::Label(fail),
                    Op::Ret(ret_errno(e)),
                ]);
            }
            Verdict::Socket => {
                ops.push(Op::Ld(ARG0_LOW));
                ops.extend(FAMILIES.iter().map(|v| Op::Jeq(*v, allow, None)));
                if !netlink {
                    ops.push(Op::Ret(ret_errno(libc::EAFNOSUPPORT)));
                    continue;
                }
                let netlink = label();
                ops.extend([
                    Op::Jeq(NETLINK, netlink, None),
                    Op::Ret(ret_errno(libc::EAFNOSUPPORT)),
                    Op::Label(netlink),
                    Op::Ld(ARG2_LOW),
                ]);
                ops.extend(NETLINK_PROTOCOLS.iter().map(|v| Op::Jeq(*v, allow, None)));
                ops.push(Op::Ret(ret_errno(libc::EPROTONOSUPPORT)));
            }
            Verdict::FailIfArg0In(values, e) => {
                let fail = label();
                ops.push(Op::Ld(ARG0_LOW));
                ops.extend(values.iter().map(|v| Op::Jeq(*v, fail, None)));
                ops.extend([
                    Op::Ret(libc::SECCOMP_RET_ALLOW),
                    Op::Label(fail),
                    Op::Ret(ret_errno(e)),
                ]);
            }
        }
    }
    ops.extend([Op::Label(allow), Op::Ret(libc::SECCOMP_RET_ALLOW)]);
    assemble(&ops)
}

/// Resolves labels into relative jumps (each within 255 instructions, as cBPF requires).
fn assemble(ops: &[Op]) -> Vec<libc::sock_filter> {
    let mut at = std::collections::HashMap::new();
    let mut pc = 0usize;
    for op in ops {
        match op {
            Op::Label(l) => {
                at.insert(*l, pc);
            }
            _ => pc += 1,
        }
    }
    let mut out = Vec::with_capacity(pc);
    let rel = |from: usize, to: usize| -> u8 {
        u8::try_from(at[&to] - from - 1).expect("a seccomp jump within 255 instructions")
    };
    for op in ops {
        let pc = out.len();
        let (code, jt, jf, k) = match *op {
            Op::Label(_) => continue,
            Op::Ld(off) => (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, off),
            Op::Jeq(v, t, f) => (
                libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
                rel(pc, t),
                f.map_or(0, |f| rel(pc, f)),
                v,
            ),
            Op::Jset(bits, t) => (
                libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K,
                rel(pc, t),
                0,
                bits,
            ),
            Op::Ret(v) => (libc::BPF_RET | libc::BPF_K, 0, 0, v),
        };
        out.push(libc::sock_filter {
            code: code as u16,
            jt,
            jf,
            k,
        });
    }
    out
}

/// `prog` as the bytes of its `struct sock_filter` array, as bwrap's `--seccomp FD` reads it
/// (native byte order: `code` u16, `jt` u8, `jf` u8, `k` u32).
pub fn to_bytes(prog: &[libc::sock_filter]) -> Vec<u8> {
    let mut out = Vec::with_capacity(prog.len() * 8);
    for i in prog {
        out.extend_from_slice(&i.code.to_ne_bytes());
        out.extend([i.jt, i.jf]);
        out.extend_from_slice(&i.k.to_ne_bytes());
    }
    out
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

    /// Runs the program on (arch, nr, first argument) as the kernel would (the subset of cBPF
    /// it uses), the third argument 0.
    fn run(p: &[libc::sock_filter], arch: u32, nr: u32, arg0: u32) -> u32 {
        run3(p, arch, nr, arg0, 0)
    }

    /// [`run`] with the third argument `arg2`.
    fn run3(p: &[libc::sock_filter], arch: u32, nr: u32, arg0: u32, arg2: u32) -> u32 {
        let (mut pc, mut a) = (0usize, 0u32);
        loop {
            let i = p[pc];
            let code = u32::from(i.code);
            match code {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    a = match i.k {
                        ARCH => arch,
                        NR => nr,
                        ARG0_LOW => arg0,
                        ARG2_LOW => arg2,
                        other => panic!("load of offset {other}"),
                    };
                }
                c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => {
                    pc += usize::from(if a == i.k { i.jt } else { i.jf });
                }
                c if c == libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K => {
                    pc += usize::from(if a & i.k != 0 { i.jt } else { i.jf });
                }
                c if c == libc::BPF_RET | libc::BPF_K => return i.k,
                other => panic!("unexpected instruction {other:#x}"),
            }
            pc += 1;
        }
    }

    #[test]
    fn keyrings_new_user_namespaces_and_clone3_are_refused_on_every_abi_and_nothing_else() {
        refused_on_every_abi_and_nothing_else(true);
        refused_on_every_abi_and_nothing_else(false);
    }

    fn refused_on_every_abi_and_nothing_else(netlink: bool) {
        let p = program(netlink);
        let allow = libc::SECCOMP_RET_ALLOW;
        for abi in &ABIS {
            for (nr, verdict) in abi.refused.into_iter().filter(|r| r.0 != NONE) {
                match verdict {
                    Verdict::Fail(e) => {
                        assert_eq!(run(&p, abi.arch, nr, 0), ret_errno(e), "{nr}");
                    }
                    Verdict::FailIfArg0(bits, e) => {
                        let other_ns = 0x0002_0000 | 0x4000_0000; // NEWNS | NEWNET
                        assert_eq!(run(&p, abi.arch, nr, other_ns), allow, "{nr}");
                        assert_eq!(run(&p, abi.arch, nr, 0x11), allow, "fork-like");
                        assert_eq!(run(&p, abi.arch, nr, bits | other_ns), ret_errno(e), "{nr}");
                    }
                    Verdict::Socket => {
                        for family in 0..64 {
                            let want = if FAMILIES.contains(&family) {
                                allow
                            } else if family == NETLINK {
                                continue;
                            } else {
                                ret_errno(libc::EAFNOSUPPORT)
                            };
                            assert_eq!(run(&p, abi.arch, nr, family), want, "{nr} {family}");
                        }
                        for protocol in 0..32 {
                            let want = if !netlink {
                                ret_errno(libc::EAFNOSUPPORT)
                            } else if NETLINK_PROTOCOLS.contains(&protocol) {
                                allow
                            } else {
                                ret_errno(libc::EPROTONOSUPPORT)
                            };
                            let got = run3(&p, abi.arch, nr, NETLINK, protocol);
                            assert_eq!(got, want, "{nr} netlink {protocol}");
                        }
                    }
                    Verdict::FailIfArg0In(refused, e) => {
                        for call in 0..21 {
                            let want = if refused.contains(&call) {
                                ret_errno(e)
                            } else {
                                allow
                            };
                            assert_eq!(run(&p, abi.arch, nr, call), want, "{nr} {call}");
                        }
                    }
                }
            }
            let refused: Vec<u32> = abi.refused.iter().map(|r| r.0).collect();
            for nr in (0..1000).filter(|n| !refused.contains(n)) {
                assert_eq!(run(&p, abi.arch, nr, CLONE_NEWUSER), allow, "{nr}");
                if abi.foreign != 0 {
                    let foreign = nr | abi.foreign;
                    let enosys = ret_errno(libc::ENOSYS);
                    assert_eq!(run(&p, abi.arch, foreign, 0), enosys, "{foreign:#x}");
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            run(&p, ABIS[0].arch, X32_BIT | 543, 0),
            ret_errno(libc::ENOSYS),
            "x32 io_setup"
        );
        assert_eq!(run(&p, 0x1234, 250, CLONE_NEWUSER), allow, "unknown ABI");
    }

    /// The native table names the calls it means (libc's numbers for this target).
    #[test]
    fn native_numbers_are_libcs() {
        let native: Vec<u32> = ABIS[0].refused.iter().map(|r| r.0).collect();
        for nr in [
            libc::SYS_add_key,
            libc::SYS_request_key,
            libc::SYS_keyctl,
            libc::SYS_clone,
            libc::SYS_unshare,
            libc::SYS_clone3,
            libc::SYS_io_setup,
            libc::SYS_io_uring_setup,
            libc::SYS_socket,
            libc::SYS_socketpair,
            libc::SYS_perf_event_open,
            libc::SYS_userfaultfd,
            libc::SYS_fanotify_init,
            libc::SYS_bpf,
            libc::SYS_syslog,
        ] {
            assert!(native.contains(&(nr as u32)), "{nr}");
        }
    }
}
