//! ATAPI CD-ROM commands.
