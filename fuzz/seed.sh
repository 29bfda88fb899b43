#!/bin/sh
# Seed the fuzz targets' corpora (the corpus directories are not committed:
# see ../.gitignore): the config targets from the example configs, the
# request-path targets from a few hand-written inputs.
set -eu
cd "$(dirname "$0")"
for target in parse_validate fmt_roundtrip; do
    mkdir -p "corpus/$target"
    for f in ../examples/*.conf seeds/*.conf; do
        [ -f "$f" ] && cp "$f" "corpus/$target/$(basename "$f")"
    done
done

mkdir -p corpus/normalize corpus/template corpus/guard
n=0
for p in / /a/b/c /a//b/./c/../d/ /%2e%2e/etc /a%2Fb%2F..%2Fc /a/%25/b /x/..%2f..%2fy \
    '/caf%C3%A9/./' /a/b/.. '/a?b' /.hidden/...; do
    n=$((n + 1)); printf '%s' "$p" > "corpus/normalize/seed-$n"
done

n=0
for t in 'http://$host$request_uri' '/v1/$1/${name}/x?$args' '$http_x_user \$literal $arg_q' \
    'Bearer $cookie_session $jwt_claim_sub $env_X' '$user.id.name $remote_addr:$server_port' \
    '${http_accept}$request_method$scheme$uri$request_id$server_name$0$9'; do
    n=$((n + 1))
    printf '%s\nq=1&a=b&q=2\n/p/a/th\nhost: example.com\nx-user: u1\ncookie: a=1; session=s\naccept: */*\n' "$t" \
        > "corpus/template/seed-$n"
done

# guard: 2 limit bytes, 8 split-seed bytes, then the stream.
n=0
for r in 'GET / HTTP/1.1\r\nHost: a\r\n\r\n' \
    'POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /next HTTP/1.1\r\nHost: a\r\n\r\n' \
    'POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n' \
    'GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nGET / HTTP/1.1\r\n\r\n' \
    'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n' 'PRI * HTTP/1.1\r\nHost: a\r\n\r\n' \
    'GET http://a/b HTTP/1.0\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx' \
    '\r\nGET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n'; do
    n=$((n + 1))
    { printf '\377\377\001\002\003\004\005\006\007\010'; printf "$r"; } > "corpus/guard/seed-$n"
done
mkdir -p corpus/hop_by_hop
printf 'connection: close, X-Secret\nx-secret: 1\nkeep-alive: 5\nte: trailers\nhost: a\nupgrade: h2c\nx-other: 2\nx-other: 3\n' \
    > corpus/hop_by_hop/seed-1
echo "seeded: $(ls corpus/parse_validate | wc -l) config files; $(ls corpus/normalize | wc -l) paths, $(ls corpus/template | wc -l) templates, $(ls corpus/guard | wc -l) request streams"

# upstream_response: 1 flag byte (bit 0: HEAD), 8 split-seed bytes, then
# what the upstream sent.
mkdir -p corpus/upstream_response
n=0
for r in 'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello' \
    'HTTP/1.1 103 Early\r\nLink: <a>\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;e=1\r\nhello\r\n0\r\nT: x\r\n\r\n' \
    'HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nto the close' \
    'HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n' \
    'HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd' \
    'HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 2\r\n\r\n1\r\na\r\n0\r\n\r\n' \
    'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x00'; do
    n=$((n + 1))
    { printf '\000\001\002\003\004\005\006\007\010'; printf "$r"; } > "corpus/upstream_response/seed-$n"
done
