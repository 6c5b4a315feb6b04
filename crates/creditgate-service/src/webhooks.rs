//! Webhook endpoints: create (the signing secret is answered once), list, delete. The
//! URL must be http(s) and, unless the node allows private targets
//! (`--webhook-allow-private`), must not name a loopback, private, link-local or
//! cloud-metadata address: a root key must not turn the server into a way to reach its
//! own network.

use std::net::{IpAddr, Ipv4Addr};

use creditgate_domain::{
    new_id, new_webhook_secret, Action, WebhookDelivery, WebhookEndpoint, WebhookEvent,
};

use crate::{Caller, FieldError, Service, ServiceError};

/// Longest endpoint URL accepted.
pub const MAX_WEBHOOK_URL_LEN: usize = 2_048;

/// A new endpoint as the caller asked for it (events parsed, distinct).
#[derive(Debug, Clone)]
pub struct CreateWebhookEndpoint {
    pub url: String,
    pub events: Vec<WebhookEvent>,
    pub description: Option<String>,
}

/// One page of endpoints (secrets are never listed).
#[derive(Debug, Clone)]
pub struct WebhookEndpointPage {
    pub endpoints: Vec<WebhookEndpoint>,
    pub cursor: Option<String>,
}

impl Service {
    pub async fn create_webhook_endpoint(
        &self,
        caller: &Caller,
        cmd: CreateWebhookEndpoint,
    ) -> Result<WebhookEndpoint, ServiceError> {
        caller.require(Action::ManageWebhooks, None)?;
        // A 422, not a 400: the field is a well-formed string, and whether its host is
        // served depends on this node's settings.
        check_webhook_url(&cmd.url, self.settings.webhook_allow_private).map_err(
            |(message, fix)| {
                ServiceError::Unprocessable(vec![FieldError::new("body.url", message).fix(fix)])
            },
        )?;
        let mut events = cmd.events;
        events.sort();
        events.dedup();
        let endpoint = WebhookEndpoint {
            id: new_id("whe"),
            workspace_id: caller.workspace().clone(),
            url: cmd.url,
            events,
            description: cmd.description,
            secret: new_webhook_secret(),
            created_at: self.clock.now_ms(),
        };
        self.store.create_webhook_endpoint(&endpoint).await?;
        Ok(endpoint)
    }

    pub async fn list_webhook_endpoints(
        &self,
        caller: &Caller,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<WebhookEndpointPage, ServiceError> {
        caller.require(Action::ManageWebhooks, None)?;
        let (endpoints, cursor) = self
            .store
            .list_webhook_endpoints(caller.workspace(), limit, cursor)
            .await?;
        Ok(WebhookEndpointPage { endpoints, cursor })
    }

    pub async fn delete_webhook_endpoint(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<(), ServiceError> {
        caller.require(Action::ManageWebhooks, None)?;
        if !self
            .store
            .delete_webhook_endpoint(caller.workspace(), id)
            .await?
        {
            return Err(ServiceError::WebhookEndpointNotFound);
        }
        Ok(())
    }
}

impl Service {
    /// One page of the deliveries to the caller's endpoint `id`, newest first, with
    /// every attempt.
    pub async fn list_webhook_deliveries(
        &self,
        caller: &Caller,
        id: &str,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<(Vec<WebhookDelivery>, Option<String>), ServiceError> {
        caller.require(Action::ManageWebhooks, None)?;
        self.store
            .list_webhook_deliveries(caller.workspace(), id, limit, cursor)
            .await?
            .ok_or(ServiceError::WebhookEndpointNotFound)
    }
}

/// Whether `url` may be a webhook target: `Err((message, fix))` if not. The host is
/// taken as the URL parser normalises it (so `http://2130706433/` is 127.0.0.1).
pub fn check_webhook_url(url: &str, allow_private: bool) -> Result<(), (String, String)> {
    let fix_url = "send an absolute http:// or https:// URL of your receiver".to_owned();
    if url.len() > MAX_WEBHOOK_URL_LEN {
        return Err((
            format!("is longer than {MAX_WEBHOOK_URL_LEN} bytes"),
            "send a shorter URL".into(),
        ));
    }
    let parsed =
        url::Url::parse(url).map_err(|e| (format!("is not a URL: {e}"), fix_url.clone()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err((
            format!(
                "has scheme {:?}; only http and https are sent to",
                parsed.scheme()
            ),
            fix_url,
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err((
            "carries credentials".into(),
            "remove the user and password; verify the webhook's signature instead".into(),
        ));
    }
    if parsed.fragment().is_some() {
        return Err(("has a fragment (#…)".into(), "remove the fragment".into()));
    }
    if allow_private {
        return Ok(());
    }
    let private = match parsed.host() {
        None => return Err(("has no host".into(), fix_url)),
        Some(url::Host::Ipv4(ip)) => private_ip(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => private_ip(IpAddr::V6(ip)),
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost"
                || name.ends_with(".localhost")
                || name.ends_with(".internal")
                || name.ends_with(".local")
                || name == "metadata"
        }
    };
    if private {
        return Err((
            "names a loopback, private, link-local or cloud-metadata host, which this server \
             does not send to"
                .into(),
            "send a public URL (a node started with --webhook-allow-private accepts private \
             ones)"
                .into(),
        ));
    }
    Ok(())
}

/// Loopback, private, link-local (cloud metadata lives at 169.254.169.254 and
/// fd00:ec2::254), shared, unspecified, multicast and broadcast addresses, and IPv6
/// forms that embed an IPv4 one.
pub fn private_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => private_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return private_v4(v4);
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local, fc00::/7 (fd00:ec2::254)
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first & 0xffc0) == 0xfec0 // site-local (deprecated)
                || first == 0x0064 // NAT64 64:ff9b::/96 embeds IPv4
                || v6.segments()[..6] == [0, 0, 0, 0, 0, 0] // IPv4-compatible ::a.b.c.d
        }
    }
}

fn private_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || a >= 240
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_http_urls_pass() {
        for url in [
            "https://hooks.example.com/creditgate",
            "http://8.8.8.8:8080/x",
            "https://[2001:4860:4860::8888]/hook?x=1",
        ] {
            let r = check_webhook_url(url, false);
            assert!(r.is_ok(), "{url}: {r:?}");
        }
    }

    #[test]
    fn private_link_local_and_metadata_targets_are_refused() {
        for url in [
            "http://127.0.0.1/",
            "http://localhost:8080/",
            "http://api.localhost/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0/",
            "http://10.1.2.3/",
            "http://172.16.0.1/",
            "http://192.168.1.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[fe80::1]/",
            "http://[fd00:ec2::254]/",
            "http://100.64.0.1/",
        ] {
            assert!(check_webhook_url(url, false).is_err(), "{url}");
            assert!(
                check_webhook_url(url, true).is_ok(),
                "{url} with private allowed"
            );
        }
    }

    #[test]
    fn only_http_without_credentials_or_fragments() {
        for url in [
            "ftp://hooks.example.com/",
            "file:///etc/passwd",
            "hooks.example.com/x",
            "https://user:pw@hooks.example.com/",
            "https://hooks.example.com/#frag",
            "javascript:alert(1)",
            "",
        ] {
            assert!(check_webhook_url(url, true).is_err(), "{url}");
        }
        let long = format!(
            "https://hooks.example.com/{}",
            "a".repeat(MAX_WEBHOOK_URL_LEN)
        );
        assert!(check_webhook_url(&long, false).is_err());
    }
}
