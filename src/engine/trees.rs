//! Which working trees are taken. Two agents in one tree corrupt each
//! other's git state (and Kiro keeps one conversation per directory), so a
//! task whose working directory is the same as, inside, or around that of a
//! task that has started and not finished waits until that one ends.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// The tree a workdir names: resolved through symbolic links where it
/// exists, else made absolute and normal by its text alone.
pub fn key(workdir: &str) -> PathBuf {
    std::fs::canonicalize(workdir).unwrap_or_else(|_| normal(Path::new(workdir)))
}

/// `.` and `..` resolved by the text, as the kernel would for a path without
/// symbolic links.
fn normal(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// One is the other or lies inside it (by whole components: /a/b and /a/bc
/// do not overlap).
pub fn overlap(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// The trees of tasks that have started and not finished.
#[derive(Default)]
pub struct Trees {
    held: BTreeMap<String, PathBuf>,
}

impl Trees {
    /// The task that holds a tree overlapping `tree`, other than `id`.
    pub fn holder(&self, id: &str, tree: &Path) -> Option<&str> {
        self.held
            .iter()
            .find(|(other, t)| other.as_str() != id && overlap(t, tree))
            .map(|(other, _)| other.as_str())
    }

    /// `id` holds its tree already: nobody else can (whoever overlaps it
    /// waits), so it need not be compared with every other again.
    pub fn holds(&self, id: &str) -> bool {
        self.held.contains_key(id)
    }

    pub fn take(&mut self, id: &str, tree: PathBuf) {
        self.held.insert(id.to_string(), tree);
    }

    pub fn release(&mut self, id: &str) {
        self.held.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_nested_and_neighbouring_trees() {
        let p = |s: &str| normal(Path::new(s));
        assert!(overlap(&p("/srv/repo"), &p("/srv/repo/")));
        assert!(overlap(&p("/srv/repo"), &p("/srv/repo/sub/./x")));
        assert!(overlap(&p("/srv/repo/sub/../"), &p("/srv/repo")));
        assert!(!overlap(&p("/srv/repo"), &p("/srv/repo2")));
        assert!(!overlap(&p("/srv/a/b"), &p("/srv/a/c")));
    }

    #[test]
    fn a_symbolic_link_names_the_tree_it_points_to() {
        let d = std::env::temp_dir().join(format!("trees-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("repo/sub")).unwrap();
        std::os::unix::fs::symlink(d.join("repo"), d.join("link")).unwrap();
        let a = key(d.join("repo").to_str().unwrap());
        let b = key(d.join("link/sub").to_str().unwrap());
        assert!(overlap(&a, &b), "{a:?} {b:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_held_tree_is_released_by_its_task_only() {
        let mut t = Trees::default();
        t.take("a", PathBuf::from("/srv/repo"));
        assert!(t.holds("a") && !t.holds("b"));
        assert_eq!(t.holder("b", Path::new("/srv/repo/sub")), Some("a"));
        assert_eq!(t.holder("a", Path::new("/srv/repo")), None);
        assert_eq!(t.holder("b", Path::new("/srv/other")), None);
        t.release("b");
        assert_eq!(t.holder("b", Path::new("/srv")), Some("a"));
        t.release("a");
        assert_eq!(t.holder("b", Path::new("/srv")), None);
    }
}
