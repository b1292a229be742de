//! The Kafka wire format: Avro single-object encoding.
//!
//! Every message value is `C3 01` (the marker), the 8-byte little-endian
//! CRC-64-AVRO (Rabin) fingerprint of the writer schema's Parsing Canonical
//! Form, then the Avro binary datum. We chose it over the Confluent framing
//! because it needs no schema registry service: every version of every schema
//! ships inside this crate, so any reader finds the writer schema from the
//! fingerprint alone, then resolves the datum to the current (reader) schema.
//! That makes replays of old topic data work after the schema evolves, as long
//! as each new version can read the old ones (checked by the compatibility
//! tests against the fixtures in `schemas/fixtures/`).

use std::collections::HashMap;

use apache_avro::rabin::Rabin;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The two marker bytes of Avro single-object encoding.
pub const MAGIC: [u8; 2] = [0xC3, 0x01];
const HEADER_LEN: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("message of {0} bytes is shorter than the 10-byte single-object header")]
    TooShort(usize),
    #[error("message does not start with the Avro single-object marker C3 01")]
    BadMagic,
    #[error("no known {subject} schema has fingerprint {fingerprint}")]
    UnknownFingerprint {
        subject: &'static str,
        fingerprint: String,
    },
    #[error("{subject}: {source}")]
    Avro {
        subject: &'static str,
        #[source]
        source: Box<apache_avro::Error>,
    },
    #[error("{subject}: {0} trailing bytes after the datum", subject = .1)]
    TrailingBytes(usize, &'static str),
}

/// Every version of one record's schema, oldest first; the last one is current.
pub struct SchemaHistory {
    pub subject: &'static str,
    pub versions: &'static [&'static str],
}

/// A record type that travels on Kafka in the single-object format.
pub trait AvroRecord: Serialize + DeserializeOwned {
    const HISTORY: SchemaHistory;
    /// The codec of this record, built once.
    fn codec() -> &'static Codec;

    /// Appends the single-object encoding of `self` to `buf`.
    fn encode_into(&self, buf: &mut Vec<u8>) -> Result<(), WireError> {
        Self::codec().encode(self, buf)
    }

    fn to_wire(&self) -> Result<Vec<u8>, WireError> {
        let mut buf = Vec::with_capacity(256);
        self.encode_into(&mut buf)?;
        Ok(buf)
    }

    fn from_wire(bytes: &[u8]) -> Result<Self, WireError> {
        Self::codec().decode(bytes)
    }
}

/// Declares a record type's schema history (oldest first, files under
/// `schemas/avro/`) and its process-wide codec:
/// `avro_record!(UsageEvent, "UsageEvent", ["usage_event.v1.avsc"]);`
#[macro_export]
macro_rules! avro_record {
    ($ty:ty, $subject:literal, [$($file:literal),+ $(,)?]) => {
        impl $crate::wire::AvroRecord for $ty {
            const HISTORY: $crate::wire::SchemaHistory = $crate::wire::SchemaHistory {
                subject: $subject,
                versions: &[$(include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/avro/", $file))),+],
            };

            fn codec() -> &'static $crate::wire::Codec {
                static CODEC: std::sync::LazyLock<$crate::wire::Codec> = std::sync::LazyLock::new(|| {
                    $crate::wire::Codec::new(&<$ty as $crate::wire::AvroRecord>::HISTORY)
                });
                &CODEC
            }
        }
    };
}

/// Encoder for the current version and decoders for every known version of
/// one subject. Schemas live for the whole process (built once per subject).
pub struct Codec {
    subject: &'static str,
    current: &'static Schema,
    header: [u8; HEADER_LEN],
    writer: GenericDatumWriter<'static>,
    readers: HashMap<[u8; 8], GenericDatumReader<'static>>,
}

/// The 8-byte fingerprint that identifies `schema` in the header.
pub fn fingerprint(schema: &Schema) -> [u8; 8] {
    let bytes = schema.fingerprint::<Rabin>().bytes;
    let mut out = [0u8; 8];
    out.copy_from_slice(&bytes[..8]);
    out
}

impl Codec {
    /// Parses every version of `history`. The schemas are compiled into the
    /// binary, so a parse failure is a build defect and panics at start-up.
    pub fn new(history: &SchemaHistory) -> Self {
        let parse = |json: &str| -> &'static Schema {
            let schema = Schema::parse_str(json).unwrap_or_else(|e| {
                panic!("embedded {} schema does not parse: {e}", history.subject)
            });
            Box::leak(Box::new(schema))
        };
        let schemas: Vec<&'static Schema> = history.versions.iter().map(|j| parse(j)).collect();
        let current = *schemas
            .last()
            .unwrap_or_else(|| panic!("{} has no schema version", history.subject));
        let mut header = [0u8; HEADER_LEN];
        header[..2].copy_from_slice(&MAGIC);
        header[2..].copy_from_slice(&fingerprint(current));
        fn build<T>(subject: &str, r: Result<T, apache_avro::Error>) -> T {
            r.unwrap_or_else(|e| panic!("{subject}: {e}"))
        }
        let writer = build(
            history.subject,
            GenericDatumWriter::builder(current).build(),
        );
        let readers = schemas
            .iter()
            .map(|writer_schema| {
                // Data written with the current schema needs no resolution,
                // and is then read straight into the type (no `Value` tree
                // in between): the processors' hot path.
                let reader = if std::ptr::eq(*writer_schema, current) {
                    GenericDatumReader::builder(writer_schema).build()
                } else {
                    GenericDatumReader::builder(writer_schema)
                        .reader_schema(current)
                        .build()
                };
                let reader = build(history.subject, reader);
                (fingerprint(writer_schema), reader)
            })
            .collect();
        Self {
            subject: history.subject,
            current,
            header,
            writer,
            readers,
        }
    }

    pub fn current_schema(&self) -> &'static Schema {
        self.current
    }

    pub fn current_fingerprint(&self) -> [u8; 8] {
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&self.header[2..]);
        fp
    }

    fn avro_err(&self, e: apache_avro::Error) -> WireError {
        WireError::Avro {
            subject: self.subject,
            source: Box::new(e),
        }
    }

    pub fn encode<T: Serialize>(&self, value: &T, buf: &mut Vec<u8>) -> Result<(), WireError> {
        let start = buf.len();
        buf.extend_from_slice(&self.header);
        if let Err(e) = self.writer.write_ser(buf, value) {
            buf.truncate(start);
            return Err(self.avro_err(e));
        }
        Ok(())
    }

    pub fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, WireError> {
        if bytes.len() < HEADER_LEN {
            return Err(WireError::TooShort(bytes.len()));
        }
        if bytes[..2] != MAGIC {
            return Err(WireError::BadMagic);
        }
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&bytes[2..HEADER_LEN]);
        let reader = self
            .readers
            .get(&fp)
            .ok_or_else(|| WireError::UnknownFingerprint {
                subject: self.subject,
                fingerprint: hex::encode(fp),
            })?;
        let mut body = &bytes[HEADER_LEN..];
        let decoded = if fp == self.current_fingerprint() {
            reader.read_deser(&mut body).map_err(|e| self.avro_err(e))?
        } else {
            let value = reader.read_value(&mut body).map_err(|e| self.avro_err(e))?;
            apache_avro::from_value(&value).map_err(|e| self.avro_err(e))?
        };
        if !body.is_empty() {
            return Err(WireError::TrailingBytes(body.len(), self.subject));
        }
        Ok(decoded)
    }
}
