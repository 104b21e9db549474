//! `ralph-qchat cancel ID`: leaves a cancel request in the state directory;
//! the daemon's intake hands it to the scheduler.

use crate::cli::CancelArgs;
use crate::exit::{self, Failure};
use crate::store::spool;
use crate::task::valid_id;

pub fn cancel(a: CancelArgs) -> Result<i32, Failure> {
    if !valid_id(&a.id) {
        return Err(Failure::new(
            exit::USAGE,
            format!("{:?} is not a valid task id", a.id),
        ));
    }
    let (_, state_dir) = super::setup::client_config(&a.config, &a.state_dir)?;
    if !spool::task_known(&state_dir, &a.id) {
        return Err(Failure::new(
            exit::NO_INPUT,
            format!("no task {:?} in {}", a.id, state_dir.display()),
        ));
    }
    let dir = spool::cancel_dir(&state_dir);
    match spool::publish(&dir, &a.id, b"") {
        Ok(p) => spool::match_owner(&state_dir, &[&p, &dir]),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(super::setup::io("write a cancel request to", &dir, e)),
    }
    println!(
        "cancel requested for task {}; the daemon stops it within poll_interval + kill_grace",
        a.id
    );
    Ok(exit::OK)
}
