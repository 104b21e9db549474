//! What a child needs from us before the clone: the paths to try, argv,
//! envp and the working directory as C strings. The child may not allocate
//! (it shares our heap and its locks), so all of it is laid out here first.
//!
//! Built into buffers a launcher keeps from one start to the next, and from
//! a copy of our environment taken when the launcher was made: reading the
//! process environment and allocating each of its strings anew per start
//! was a twentieth of the daemon's CPU per request at high rates. Our
//! environment does not change once the workers run (it is set, if at all,
//! at the top of main).

use super::spawn::Spec;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

const NULL: usize = usize::MAX;

/// The environment a launcher was made with, as `K=V` entries.
pub struct BaseEnv {
    bytes: Vec<u8>,
    /// (start, length of the key, end) of each entry in `bytes`.
    entries: Vec<(usize, usize, usize)>,
}

impl BaseEnv {
    pub fn of_process() -> BaseEnv {
        BaseEnv::from_vars(std::env::vars_os().map(|(k, v)| (k.into_vec(), v.into_vec())))
    }

    pub fn from_vars(vars: impl Iterator<Item = (Vec<u8>, Vec<u8>)>) -> BaseEnv {
        let mut e = BaseEnv {
            bytes: Vec::new(),
            entries: Vec::new(),
        };
        for (k, v) in vars {
            let start = e.bytes.len();
            e.bytes.extend_from_slice(&k);
            e.bytes.push(b'=');
            e.bytes.extend_from_slice(&v);
            e.entries.push((start, k.len(), e.bytes.len()));
        }
        e
    }

    fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.entries
            .iter()
            .map(|&(s, k, end)| (&self.bytes[s..s + k], &self.bytes[s..end]))
    }

    fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.iter()
            .find(|(k, _)| *k == key)
            .map(|(k, kv)| &kv[k.len() + 1..])
    }
}

/// The laid-out strings and the pointer arrays into them; valid until the
/// next `build`.
#[derive(Default)]
pub struct Plan {
    bytes: Vec<u8>,
    offsets: Vec<usize>,
    ptrs: Vec<*const libc::c_char>,
    argv: usize,
    envp: usize,
    cwd: usize,
}

impl Plan {
    /// Our environment, then the request's variables, a later one replacing
    /// an earlier one of the same name (as Command::env does); the program
    /// looked up in the PATH of that environment, as execvp would.
    pub fn build(&mut self, req: &Spec, base: &BaseEnv) -> io::Result<()> {
        self.bytes.clear();
        self.offsets.clear();
        self.ptrs.clear();
        let overridden = |key: &[u8]| req.env.iter().any(|(k, _)| k.as_bytes() == key);
        let path = match req.env.iter().rev().find(|(k, _)| k == "PATH") {
            Some((_, v)) => Some(v.as_bytes()),
            None => base.get(b"PATH"),
        };
        let program = req.program.as_bytes();
        for c in Candidates::new(program, path) {
            self.push(&c)?;
        }
        self.offsets.push(NULL);
        self.argv = self.offsets.len();
        self.push(&[program])?;
        for a in req.args {
            self.push(&[a.as_bytes()])?;
        }
        self.offsets.push(NULL);
        self.envp = self.offsets.len();
        for (k, kv) in base.iter() {
            if !overridden(k) {
                self.push(&[kv])?;
            }
        }
        for (i, (k, v)) in req.env.iter().enumerate() {
            if !req.env[i + 1..].iter().any(|(later, _)| later == k) {
                self.push(&[k.as_bytes(), b"=", v.as_bytes()])?;
            }
        }
        self.offsets.push(NULL);
        self.cwd = self.offsets.len();
        self.push(&[req.workdir.as_os_str().as_bytes()])?;
        let at = self.bytes.as_ptr();
        self.ptrs.extend(self.offsets.iter().map(|&o| {
            if o == NULL {
                std::ptr::null()
            } else {
                // SAFETY: every offset lies inside `bytes`, which is not
                // touched again until the next build.
                unsafe { at.add(o) }.cast()
            }
        }));
        Ok(())
    }

    fn push(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        if parts.iter().any(|p| p.contains(&0)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{:?} contains a NUL byte",
                    String::from_utf8_lossy(&parts.concat())
                ),
            ));
        }
        self.offsets.push(self.bytes.len());
        for p in parts {
            self.bytes.extend_from_slice(p);
        }
        self.bytes.push(0);
        Ok(())
    }

    pub fn candidates(&self) -> *const *const libc::c_char {
        self.ptrs.as_ptr()
    }

    pub fn argv(&self) -> *const *const libc::c_char {
        self.ptrs[self.argv..].as_ptr()
    }

    pub fn envp(&self) -> *const *const libc::c_char {
        self.ptrs[self.envp..].as_ptr()
    }

    pub fn cwd(&self) -> *const libc::c_char {
        self.ptrs[self.cwd]
    }
}

/// The paths to try, in order, as execvp would: the program itself when it
/// names a path, else each PATH entry (an empty entry is the working
/// directory), each as the parts to join.
type Dirs<'a> = std::slice::Split<'a, u8, fn(&u8) -> bool>;

struct Candidates<'a> {
    program: &'a [u8],
    dirs: Option<Dirs<'a>>,
    alone: bool,
}

impl<'a> Candidates<'a> {
    fn new(program: &'a [u8], path: Option<&'a [u8]>) -> Candidates<'a> {
        let alone = program.contains(&b'/');
        let colon: fn(&u8) -> bool = |&b| b == b':';
        Candidates {
            program,
            dirs: (!alone).then(|| path.unwrap_or(b"/bin:/usr/bin").split(colon)),
            alone,
        }
    }
}

impl<'a> Iterator for Candidates<'a> {
    type Item = [&'a [u8]; 3];

    fn next(&mut self) -> Option<[&'a [u8]; 3]> {
        if self.alone {
            self.alone = false;
            return Some([self.program, b"", b""]);
        }
        let dir = self.dirs.as_mut()?.next()?;
        let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
        Some([dir, b"/", self.program])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::cgroup::Joins;
    use std::ffi::{CStr, OsStr, OsString};
    use std::path::Path;

    fn strings(mut p: *const *const libc::c_char) -> Vec<String> {
        let mut v = vec![];
        // SAFETY: a NULL-terminated array of C strings the plan built.
        unsafe {
            while !(*p).is_null() {
                v.push(CStr::from_ptr(*p).to_string_lossy().into_owned());
                p = p.add(1);
            }
        }
        v
    }

    fn candidates(program: &str, path: Option<&str>) -> Vec<Vec<u8>> {
        Candidates::new(program.as_bytes(), path.map(str::as_bytes))
            .map(|c| c.concat())
            .collect()
    }

    #[test]
    fn candidates_follow_execvp() {
        assert_eq!(
            candidates("q", Some("/a::/b")),
            [b"/a/q".to_vec(), b"./q".to_vec(), b"/b/q".to_vec()]
        );
        assert_eq!(candidates("./bin/q", Some("/a")), [b"./bin/q".to_vec()]);
        assert_eq!(
            candidates("q", None),
            [b"/bin/q".to_vec(), b"/usr/bin/q".to_vec()]
        );
    }

    #[test]
    fn request_variables_replace_ours_and_path_comes_from_the_result() {
        let base = BaseEnv::from_vars(
            [("A", "1"), ("PATH", "/ours"), ("B", "2")]
                .into_iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())),
        );
        let os = |s: &str| OsString::from(s);
        let env = vec![
            (os("B"), os("x")),
            (os("C"), os("3")),
            (os("B"), os("y")),
            (os("PATH"), os("/theirs:/more")),
        ];
        let args = vec![os("--flag"), os("two words")];
        let joins = Joins::default();
        let spec = Spec {
            role: "agent command",
            program: OsStr::new("q"),
            args: &args,
            env: &env,
            workdir: Path::new("/work/dir"),
            max_as: 0,
            joins: &joins,
            nonblocking: false,
        };
        let mut plan = Plan::default();
        // Twice: the second build reuses the first one's buffers.
        for _ in 0..2 {
            plan.build(&spec, &base).unwrap();
            assert_eq!(strings(plan.candidates()), ["/theirs/q", "/more/q"]);
            assert_eq!(strings(plan.argv()), ["q", "--flag", "two words"]);
            assert_eq!(
                strings(plan.envp()),
                ["A=1", "C=3", "B=y", "PATH=/theirs:/more"]
            );
            // SAFETY: a C string the plan built.
            assert_eq!(
                unsafe { CStr::from_ptr(plan.cwd()) }.to_bytes(),
                b"/work/dir"
            );
        }
        let bad = vec![os("a\0b")];
        let spec = Spec { args: &bad, ..spec };
        let e = plan.build(&spec, &base).unwrap_err();
        assert!(e.to_string().contains("NUL"), "{e}");
    }
}
