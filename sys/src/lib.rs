pub mod clock;
pub mod cuda;
pub mod cxx;
pub mod hip;
pub mod numa;
