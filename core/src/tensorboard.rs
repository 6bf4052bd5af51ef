//! TensorBoard's event files, written without TensorFlow: the messages of TensorBoard's
//! `event.proto`, `summary.proto` and `tensor.proto` that a run writes (only the fields it
//! sets, with their field numbers), encoded by prost and framed as TFRecords: the data's
//! length (u64, little-endian), the masked CRC-32C of those 8 bytes, the data, the masked
//! CRC-32C of the data. TensorBoard, `tensorboard.backend.event_processing`, TensorFlow's
//! `tf.data.TFRecordDataset` and W&B's importer read them.

use prost::Message;

use crate::{Error, Result};

/// `Event`: one record of an event file.
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    pub what: Option<What>,
}

/// What an [`Event`] carries.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    /// The first record of every file: "brain.Event:2".
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

/// `Summary.Value`: one tag's value at the event's step.
#[derive(Clone, PartialEq, Message)]
pub struct Value {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
    #[prost(oneof = "Kind", tags = "2, 4, 8")]
    pub kind: Option<Kind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Kind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "4")]
    Image(Image),
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

/// `Summary.Image`: an encoded (PNG) image.
#[derive(Clone, PartialEq, Message)]
pub struct Image {
    #[prost(int32, tag = "1")]
    pub height: i32,
    #[prost(int32, tag = "2")]
    pub width: i32,
    /// 3: RGB.
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
    #[prost(string, tag = "2")]
    pub display_name: String,
    #[prost(string, tag = "3")]
    pub summary_description: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

/// `TensorProto`, for the text plugin's scalar string tensors only.
#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    /// 7: DT_STRING.
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    /// A scalar: present, with no dimensions.
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorShape {}

/// `SessionLog`: a (re)start of the writer at the event's step.
#[derive(Clone, PartialEq, Message)]
pub struct SessionLog {
    /// 1: START.
    #[prost(int32, tag = "1")]
    pub status: i32,
    #[prost(string, tag = "3")]
    pub msg: String,
}

const DT_STRING: i32 = 7;
/// `SessionLog.START`.
pub const SESSION_START: i32 = 1;

impl Event {
    /// The file's first record.
    pub fn file_version(wall_time: f64) -> Self {
        Self {
            wall_time,
            step: 0,
            what: Some(What::FileVersion("brain.Event:2".into())),
        }
    }

    fn summary(wall_time: f64, step: u64, value: Value) -> Self {
        Self {
            wall_time,
            step: step as i64,
            what: Some(What::Summary(Summary { value: vec![value] })),
        }
    }

    /// A scalar (TensorBoard's Scalars tab).
    pub fn scalar(wall_time: f64, step: u64, tag: &str, v: f64) -> Self {
        Self::summary(
            wall_time,
            step,
            Value {
                tag: tag.into(),
                metadata: None,
                kind: Some(Kind::SimpleValue(v as f32)),
            },
        )
    }

    /// Markdown text (the Text tab): a scalar string tensor of the text plugin.
    pub fn text(wall_time: f64, step: u64, tag: &str, markdown: &str) -> Self {
        Self::summary(
            wall_time,
            step,
            Value {
                tag: tag.into(),
                metadata: Some(SummaryMetadata {
                    plugin_data: Some(PluginData {
                        plugin_name: "text".into(),
                        content: Vec::new(),
                    }),
                    display_name: String::new(),
                    summary_description: String::new(),
                }),
                kind: Some(Kind::Tensor(TensorProto {
                    dtype: DT_STRING,
                    tensor_shape: Some(TensorShape {}),
                    string_val: vec![markdown.as_bytes().to_vec()],
                })),
            },
        )
    }

    /// A PNG image of `width` x `height` RGB pixels (the Images tab).
    pub fn image(
        wall_time: f64,
        step: u64,
        tag: &str,
        png: Vec<u8>,
        width: u32,
        height: u32,
    ) -> Self {
        Self::summary(
            wall_time,
            step,
            Value {
                tag: tag.into(),
                metadata: None,
                kind: Some(Kind::Image(Image {
                    height: height as i32,
                    width: width as i32,
                    colorspace: 3,
                    encoded_image_string: png,
                })),
            },
        )
    }

    /// A restart of the writer at `step`: TensorBoard drops what it had read of later
    /// steps (`purge_orphaned_data`).
    pub fn session_start(wall_time: f64, step: u64, msg: &str) -> Self {
        Self {
            wall_time,
            step: step as i64,
            what: Some(What::SessionLog(SessionLog {
                status: SESSION_START,
                msg: msg.into(),
            })),
        }
    }

    /// The tags of its summary values (none for other events).
    pub fn tags(&self) -> impl Iterator<Item = &str> {
        let values = match &self.what {
            Some(What::Summary(s)) => s.value.as_slice(),
            _ => &[],
        };
        values.iter().map(|v| v.tag.as_str())
    }
}

/// TFRecord's masked CRC-32C.
fn masked_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
        .rotate_right(15)
        .wrapping_add(0xa282_ead8)
}

/// Append `event` to `out` as one TFRecord.
pub fn write_record(out: &mut Vec<u8>, event: &Event) {
    let data = event.encode_to_vec();
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(&data);
    out.extend_from_slice(&masked_crc(&data).to_le_bytes());
}

/// The events of an event file, each with its record's bytes (to be written again as
/// they were), up to the first record that fails its checks, and that failure (an error
/// naming `name` and the record's offset).
pub fn read_records(name: &str, bytes: &[u8]) -> (Vec<(Event, Vec<u8>)>, Option<Error>) {
    let mut out = Vec::new();
    let damage = read_into(name, bytes, &mut out).err();
    (out, damage)
}

fn read_into(name: &str, mut bytes: &[u8], out: &mut Vec<(Event, Vec<u8>)>) -> Result<()> {
    let total = bytes.len();
    while !bytes.is_empty() {
        let at = total - bytes.len();
        let bad = |why: &str| Error::Data(format!("{name}: event record at byte {at}: {why}"));
        if bytes.len() < 12 {
            return Err(bad("cut short"));
        }
        let len_bytes = &bytes[..8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        if u32::from_le_bytes(bytes[8..12].try_into().unwrap()) != masked_crc(len_bytes) {
            return Err(bad("its length fails its CRC"));
        }
        let whole = len
            .checked_add(16)
            .filter(|&n| n <= bytes.len())
            .ok_or_else(|| bad("cut short"))?;
        let data = &bytes[12..12 + len];
        if u32::from_le_bytes(bytes[12 + len..whole].try_into().unwrap()) != masked_crc(data) {
            return Err(bad("its data fails its CRC"));
        }
        let event = Event::decode(data).map_err(|e| bad(&format!("not an Event: {e}")))?;
        out.push((event, bytes[..whole].to_vec()));
        bytes = &bytes[whole..];
    }
    Ok(())
}

/// An event file's name as TensorBoard finds it: `events.out.tfevents.{seconds}.{host}`
/// (the host part tells sessions apart; `tag` follows it).
pub fn file_name(unix_seconds: u64, host: &str, tag: &str) -> String {
    format!("events.out.tfevents.{unix_seconds:010}.{host}.{tag}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_named() {
        let mut buf = Vec::new();
        let events = [
            Event::file_version(1.5),
            Event::scalar(2.0, 10, "train/loss", 4.25),
            Event::text(2.0, 0, "config", "lr = 20"),
            Event::image(3.0, 5, "allocation", vec![1, 2, 3], 4, 2),
            Event::session_start(4.0, 7, "resumed"),
        ];
        for e in &events {
            write_record(&mut buf, e);
        }
        let (back, damage) = read_records("f", &buf);
        assert!(damage.is_none());
        assert_eq!(
            back.iter().map(|(e, _)| e.clone()).collect::<Vec<_>>(),
            events
        );
        assert_eq!(back.iter().map(|(_, b)| b.len()).sum::<usize>(), buf.len());
        assert_eq!(back[1].0.tags().collect::<Vec<_>>(), ["train/loss"]);
        // Damage: the records before it, and where it is.
        let first = back[0].1.len();
        let mut flipped = buf.clone();
        flipped[first + 14] ^= 1;
        let (before, e) = read_records("tb/f", &flipped);
        assert_eq!(before.len(), 1);
        let e = e.unwrap().to_string();
        assert!(e.contains("tb/f") && e.contains("CRC"), "{e}");
        assert!(e.contains(&format!("byte {first}")), "{e}");
        let (before, e) = read_records("f", &buf[..buf.len() - 3]);
        assert_eq!(before.len(), events.len() - 1);
        assert!(e.unwrap().to_string().contains("cut short"));
    }
}
