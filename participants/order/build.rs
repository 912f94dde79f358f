//! Rebuilds when a migration changes: `sqlx::migrate!` embeds the folder, and cargo cannot see
//! into a proc macro's reads.

fn main() {
    println!("cargo:rerun-if-changed=../../migrations/order");
}
