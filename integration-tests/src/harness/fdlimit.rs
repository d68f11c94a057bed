//! The open-file limit of this process (children inherit it): the idle and
//! scale benchmarks hold one socket per agent stream on each side.

/// Raises `RLIMIT_NOFILE` to at least `want` when allowed (root may raise the
/// hard limit, up to `fs.nr_open`), else the soft limit to the hard one.
/// Returns the soft limit in force afterwards.
pub fn raise(want: u64) -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 0;
        }
        if l.rlim_cur >= want {
            return l.rlim_cur;
        }
        if l.rlim_max < want {
            let more = libc::rlimit {
                rlim_cur: want,
                rlim_max: want,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &more) == 0 {
                return want;
            }
        }
        l.rlim_cur = l.rlim_max.min(want.max(l.rlim_cur));
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        let mut now = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut now);
        now.rlim_cur
    }
}
