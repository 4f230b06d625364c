//! AccessLog (envoy.config.accesslog.v3) → telemetry::access_log::AccessLog: the file, stdout
//! and stderr loggers, their formats, and the status code filter.

use envoy_types::pb::envoy::config::accesslog::v3 as accesslog;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::access_loggers::file::v3 as file;
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3 as stream;
use envoy_types::pb::google::protobuf;

use super::common::unpack;
use super::{refuse_if, At, FieldError, FieldResult};
use crate::telemetry::access_log::{self, AccessLog, Comparison, LogFormat, StatusFilter, ENVOY_DEFAULT_FORMAT};

const FILE_TYPE: &str = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog";
const STDOUT_TYPE: &str = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
const STDERR_TYPE: &str = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog";

/// A connection manager's access_log list.
pub(crate) fn access_logs(logs: &[accesslog::AccessLog]) -> FieldResult<Vec<AccessLog>> {
    logs.iter().enumerate().map(|(i, log)| access_log(log).at(format!("access_log[{i}]"))).collect()
}

fn access_log(log: &accesslog::AccessLog) -> FieldResult<AccessLog> {
    let filter = match &log.filter {
        Some(filter) => Some(status_filter(filter).at("filter")?),
        None => None,
    };
    let any = match &log.config_type {
        Some(accesslog::access_log::ConfigType::TypedConfig(any)) => any,
        None => return Err(FieldError::new("typed_config", "is required")),
    };
    let (path, format) = match any.type_url.as_str() {
        FILE_TYPE => {
            let config: file::FileAccessLog = unpack(any, FILE_TYPE).at("typed_config")?;
            if config.path.is_empty() {
                return Err(FieldError::new("typed_config.path", "is required"));
            }
            use file::file_access_log::AccessLogFormat as F;
            let format = match &config.access_log_format {
                None => default_format(),
                Some(F::Format(text)) if text.is_empty() => default_format(),
                Some(F::Format(text)) => text_format(text).at("typed_config.format")?,
                Some(F::JsonFormat(fields)) => json_format(fields).at("typed_config.json_format")?,
                Some(F::TypedJsonFormat(_)) => return Err(FieldError::unsupported("typed_config.typed_json_format")),
                Some(F::LogFormat(format)) => substitution_format(format).at("typed_config.log_format")?,
            };
            (config.path, format)
        }
        STDOUT_TYPE => {
            let config: stream::StdoutAccessLog = unpack(any, STDOUT_TYPE).at("typed_config")?;
            let format = match &config.access_log_format {
                Some(stream::stdout_access_log::AccessLogFormat::LogFormat(f)) => substitution_format(f).at("typed_config.log_format")?,
                None => default_format(),
            };
            ("/dev/stdout".to_string(), format)
        }
        STDERR_TYPE => {
            let config: stream::StderrAccessLog = unpack(any, STDERR_TYPE).at("typed_config")?;
            let format = match &config.access_log_format {
                Some(stream::stderr_access_log::AccessLogFormat::LogFormat(f)) => substitution_format(f).at("typed_config.log_format")?,
                None => default_format(),
            };
            ("/dev/stderr".to_string(), format)
        }
        other => return Err(FieldError::new("typed_config", format!("access logger {other} is not supported by meshctl yet"))),
    };
    let sink = access_log::sink(&path).map_err(|reason| FieldError::new("typed_config.path", reason))?;
    Ok(AccessLog { format, sink, filter })
}

fn default_format() -> LogFormat {
    LogFormat::Text { pieces: access_log::parse_format(ENVOY_DEFAULT_FORMAT).expect("Envoy's default format parses") }
}

fn text_format(text: &str) -> FieldResult<LogFormat> {
    Ok(LogFormat::Text { pieces: access_log::parse_format(text).map_err(|reason| FieldError::new("", reason))? })
}

fn substitution_format(f: &core::SubstitutionFormatString) -> FieldResult<LogFormat> {
    use core::substitution_format_string::Format;
    refuse_if(f.omit_empty_values, "omit_empty_values")?;
    refuse_if(!f.formatters.is_empty(), "formatters")?;
    refuse_if(f.json_format_options.is_some(), "json_format_options")?;
    match &f.format {
        Some(Format::TextFormat(text)) => text_format(text).at("text_format"),
        Some(Format::TextFormatSource(source)) => match &source.specifier {
            Some(core::data_source::Specifier::InlineString(text)) => text_format(text).at("text_format_source.inline_string"),
            Some(core::data_source::Specifier::InlineBytes(bytes)) => {
                let text = std::str::from_utf8(bytes).map_err(|_| FieldError::new("text_format_source.inline_bytes", "is not UTF-8"))?;
                text_format(text).at("text_format_source.inline_bytes")
            }
            _ => Err(FieldError::new("text_format_source", "only inline_string and inline_bytes are supported by meshctl")),
        },
        Some(Format::JsonFormat(fields)) => json_format(fields).at("json_format"),
        None => Ok(default_format()),
    }
}

/// Flat JSON objects whose values are format strings (nested objects and literal numbers refused).
fn json_format(fields: &protobuf::Struct) -> FieldResult<LogFormat> {
    let mut keys: Vec<&String> = fields.fields.keys().collect();
    // Sorted, as Envoy prints them (a protobuf Struct's keys have no order).
    keys.sort();
    let mut decoded = Vec::with_capacity(keys.len());
    for key in keys {
        let value = &fields.fields[key];
        let Some(protobuf::value::Kind::StringValue(format)) = &value.kind else {
            return Err(FieldError::new(key.as_str(), "meshctl supports only format strings as JSON values"));
        };
        let pieces = access_log::parse_format(format).map_err(|reason| FieldError::new(key.as_str(), reason))?;
        decoded.push((key.clone(), pieces));
    }
    Ok(LogFormat::Json { fields: decoded })
}

fn status_filter(filter: &accesslog::AccessLogFilter) -> FieldResult<StatusFilter> {
    use accesslog::access_log_filter::FilterSpecifier;
    let Some(FilterSpecifier::StatusCodeFilter(status)) = &filter.filter_specifier else {
        return Err(FieldError::new("", "only status_code_filter is supported by meshctl yet"));
    };
    let comparison = status.comparison.as_ref().ok_or_else(|| FieldError::new("status_code_filter.comparison", "is required"))?;
    let op = match accesslog::comparison_filter::Op::try_from(comparison.op) {
        Ok(accesslog::comparison_filter::Op::Eq) => Comparison::Eq,
        Ok(accesslog::comparison_filter::Op::Ge) => Comparison::Ge,
        Ok(accesslog::comparison_filter::Op::Le) => Comparison::Le,
        _ => return Err(FieldError::new("status_code_filter.comparison.op", format!("unknown value {}", comparison.op))),
    };
    let value = comparison.value.as_ref().ok_or_else(|| FieldError::new("status_code_filter.comparison.value", "is required"))?;
    // Envoy requires a runtime key, whose value overrides default_value at run time; meshctl has
    // no runtime layer, so no key ever has a value and default_value is what Envoy uses too.
    let value = u16::try_from(value.default_value)
        .map_err(|_| FieldError::new("status_code_filter.comparison.value.default_value", "is not a status code"))?;
    Ok(StatusFilter { op, value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn logger(type_url: &str, config: impl Message) -> accesslog::AccessLog {
        accesslog::AccessLog {
            name: "test".into(),
            config_type: Some(accesslog::access_log::ConfigType::TypedConfig(protobuf::Any { type_url: type_url.into(), value: config.encode_to_vec() })),
            ..Default::default()
        }
    }

    fn text_source(text: &str) -> core::SubstitutionFormatString {
        core::SubstitutionFormatString {
            format: Some(core::substitution_format_string::Format::TextFormatSource(core::DataSource {
                specifier: Some(core::data_source::Specifier::InlineString(text.into())),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn refused(logs: &[accesslog::AccessLog]) -> crate::xds::ConfigError {
        access_logs(logs).map(|_| ()).unwrap_err().into_config_error("Listener \"l\"")
    }

    #[test]
    fn an_unsupported_operator_is_a_nack_naming_it_and_its_field() {
        let file = file::FileAccessLog {
            path: "/dev/null".into(),
            access_log_format: Some(file::file_access_log::AccessLogFormat::LogFormat(text_source("%REQ(:METHOD)% %UPSTREAM_TRANSPORT_FAILURE_REASON%\n"))),
        };
        let error = refused(&[logger(STDERR_TYPE, stream::StderrAccessLog::default()), logger(FILE_TYPE, file)]);
        assert_eq!(error.field, "access_log[1].typed_config.log_format.text_format_source.inline_string");
        assert!(error.reason.contains("%UPSTREAM_TRANSPORT_FAILURE_REASON%"), "{error}");
    }

    #[test]
    fn filters_other_than_status_code_and_unknown_loggers_are_refused() {
        let mut log = logger(STDERR_TYPE, stream::StderrAccessLog::default());
        log.filter = Some(accesslog::AccessLogFilter {
            filter_specifier: Some(accesslog::access_log_filter::FilterSpecifier::DurationFilter(Default::default())),
        });
        assert_eq!(refused(&[log]).field, "access_log[0].filter");
        let grpc = logger("type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig", file::FileAccessLog::default());
        assert!(refused(&[grpc]).reason.contains("is not supported"));
        let nameless = logger(FILE_TYPE, file::FileAccessLog::default());
        assert_eq!(refused(&[nameless]).field, "access_log[0].typed_config.path");
    }

    #[test]
    fn stderr_without_a_format_writes_envoys_default_and_json_keys_are_sorted() {
        let logs = access_logs(&[logger(STDERR_TYPE, stream::StderrAccessLog::default())]).unwrap();
        assert_eq!(logs[0].sink.path, "/dev/stderr");
        assert!(matches!(&logs[0].format, LogFormat::Text { pieces } if *pieces == access_log::parse_format(ENVOY_DEFAULT_FORMAT).unwrap()));
        let fields = protobuf::Struct {
            fields: [("b", "%RESPONSE_CODE%"), ("a", "%PROTOCOL%")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), protobuf::Value { kind: Some(protobuf::value::Kind::StringValue(v.into())) }))
                .collect(),
        };
        let json = stream::StdoutAccessLog {
            access_log_format: Some(stream::stdout_access_log::AccessLogFormat::LogFormat(core::SubstitutionFormatString {
                format: Some(core::substitution_format_string::Format::JsonFormat(fields)),
                ..Default::default()
            })),
        };
        let logs = access_logs(&[logger(STDOUT_TYPE, json)]).unwrap();
        let LogFormat::Json { fields } = &logs[0].format else { panic!("not JSON") };
        assert_eq!(fields.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    }
}
