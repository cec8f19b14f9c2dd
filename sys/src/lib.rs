pub mod cxx;
pub mod hip;
pub mod numa;
