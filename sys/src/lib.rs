pub mod hip;
pub mod numa;
